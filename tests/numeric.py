"""Float comparisons that hold on every CPU.

float32 reductions (matmuls, sums over a batch) give results whose last bits depend on the
summation order, which differs between CPUs (other BLAS kernels) and between one batch and the
same rows split into micro-batches. The honest error bound of such a result scales with the
norm of the whole tensor, not with each element: compare the difference's norm to it.
"""
from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| over all elements, in float64."""
    a, e = actual.detach().double().flatten(), expected.detach().double().flatten()
    return float((a - e).norm() / e.norm().clamp_min(torch.finfo(torch.float64).tiny))


def assert_close_to_norm(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4, msg: str = "") -> None:
    """``actual`` equals ``expected`` up to ``rel`` of its norm. float32 summation-order noise is ~1e-6
    to 1e-5 of the norm; a real bug (a missing or doubled term, a wrong scale) is >= 1e-2."""
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = relative_error(actual, expected)
    assert err <= rel, f"{msg} relative error {err:.3g} > {rel:g} (norm of expected {expected.double().norm():.4g})"
