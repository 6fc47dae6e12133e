"""Flow-matching math, shared by the stochastic sampler (RL) and the SFT loss.

Time convention (the rectified-flow one, i.e. the OPPOSITE of pi0's):
  t = 0 is pure noise, t = 1 is data.  x_t = (1 - t) * noise + t * action,
  velocity target u = d x_t / dt = action - noise.
  Denoising integrates forward: t_k = k / K, dt = 1 / K, x_{k+1} = x_k + dt * v(x_k, t_k).
(pi0 uses t = 1 for noise, u = noise - action and integrates with dt = -1/K; t_ours = 1 - t_pi0,
so pi0's Beta(1.5, 1) time density becomes Beta(1, 1.5) here.)

Stochastic denoising for RL (flow-noise, as ReinFlow / RLinf's flow-noise for pi0): every Euler
step is a Gaussian transition x_{k+1} ~ N(x_k + dt * v, sigma_k^2 I). Given the stored chain
x_0..x_K, log p(chain) = sum_k log N(x_{k+1}; mean_k, sigma_k^2), exactly. The initial-noise
density log N(x_0; 0, I) does not depend on the weights and is left out.

Which terms enter log p (``ChainScoring``, the policy config's ``noise.stochastic_steps`` and
``noise.score``): a step that adds no noise (``stochastic_steps: last`` keeps only the last one
stochastic, as DPPO fine-tunes the last denoising steps) is the deterministic Euler step and has no
term (``none``: every step deterministic, so a sample is the ODE from a random x_0 and log p is 0: for
filtered BC, which needs no likelihood); ``score: executed`` leaves out the last step's terms for the
chunk positions the actor does not execute. Those draws reach neither the env nor a later step, so
their score has zero mean given the rest: the policy gradient keeps its expectation and loses their
variance (PPO's ratio is then a density over fewer dimensions: with K = 4, H = 8, k = 4, 196 or, with
``last``, 28 instead of 224).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

LOG_2PI = math.log(2.0 * math.pi)
STOCHASTIC_STEPS = ("all", "last", "none")
SCORES = ("chunk", "executed")


def scored_terms(num_steps: int, chunk_size: int, exec_horizon: int, stochastic_steps: str = "all",
                 score: str = "chunk") -> torch.Tensor:
    """[K, H] bool: the transition terms (step, chunk position) that enter log p(chain). A step
    is stochastic iff its row has any True (every step is scored at chunk position 0)."""
    if stochastic_steps not in STOCHASTIC_STEPS or score not in SCORES:
        raise ValueError(f"noise.stochastic_steps={stochastic_steps!r} (expected one of {STOCHASTIC_STEPS}), "
                         f"noise.score={score!r} (expected one of {SCORES})")
    terms = torch.ones(num_steps, chunk_size, dtype=torch.bool, device="cpu")  # also under torch.device("meta")
    if stochastic_steps == "last":
        terms[:-1] = False
    elif stochastic_steps == "none":  # the ODE from a random x_0: a sample of the flow, nothing to score
        terms[:] = False
    if score == "executed":
        terms[-1, exec_horizon:] = False
    return terms


def interpolate(noise: torch.Tensor, actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) noise + t actions; ``t`` broadcasts (e.g. [B, 1, 1])."""
    return (1.0 - t) * noise + t * actions


def velocity_target(noise: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    return actions - noise


def sample_time(batch: int, dist: str, alpha: float, beta: float, t_max: float,
                generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """SFT training times in [0, t_max] (t_max < 1 keeps the target's x_t away from pure data).

    "uniform", or "beta": Beta(alpha, beta). With alpha == 1 or beta == 1 it is drawn by inverse
    CDF, so a ``generator`` makes it reproducible; other shapes use torch.distributions (global RNG).
    """
    u = torch.rand(batch, generator=generator, device=device)
    if dist == "uniform":
        t = u
    elif dist == "beta":
        if alpha == 1.0:  # CDF 1 - (1 - t)^beta
            t = 1.0 - (1.0 - u) ** (1.0 / beta)
        elif beta == 1.0:  # CDF t^alpha
            t = u ** (1.0 / alpha)
        else:
            t = torch.distributions.Beta(torch.tensor(float(alpha), device=device),
                                         torch.tensor(float(beta), device=device)).sample((batch,))
    else:
        raise ValueError(f"unknown time distribution {dist!r} (uniform | beta)")
    return t * t_max


def bounded_sigma(raw: torch.Tensor, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Learned noise level squashed into [sigma_min, sigma_max]."""
    return sigma_min + (sigma_max - sigma_min) * torch.sigmoid(raw)


def inverse_bounded_sigma(sigma: float, sigma_min: float, sigma_max: float) -> float:
    """The raw value whose ``bounded_sigma`` is ``sigma`` (for initialising the noise head)."""
    if sigma_max <= sigma_min:
        return 0.0
    p = min(max((sigma - sigma_min) / (sigma_max - sigma_min), 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def scheduled_sigma(num_steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """sigma_k linear from sigma_max (first step) to sigma_min (last step); constant if equal."""
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float32)
    frac = torch.arange(num_steps, dtype=torch.float32) / (num_steps - 1)
    return sigma_max + (sigma_min - sigma_max) * frac


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Element-wise log N(x; mean, sigma^2)."""
    z = (x - mean) / sigma
    return -0.5 * z * z - torch.log(sigma) - 0.5 * LOG_2PI


def gaussian_entropy(sigma: torch.Tensor) -> torch.Tensor:
    """Element-wise entropy of N(., sigma^2): 0.5 log(2 pi e sigma^2)."""
    return 0.5 * (LOG_2PI + 1.0) + torch.log(sigma)


def scored_sum(values: torch.Tensor, terms: Optional[torch.Tensor]) -> torch.Tensor:
    """[B] float64: the sum of element-wise ``values`` [B, K, H, A] over the ``terms`` [K, H]
    that are scored (None: all)."""
    if terms is not None:
        values = values * terms[None, :, :, None]
    return values.double().sum((1, 2, 3))


def chain_log_prob(chain: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor,
                   terms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B]: log-density of a stored chain's K transitions (chain [B, K+1, H, A]; mean, sigma
    [B, K, H, A]) over the ``terms`` [K, H] that are scored (None: all), summed in float64 so that
    sample and evaluate agree to float precision."""
    return scored_sum(gaussian_log_prob(chain[:, 1:], mean, sigma), terms).float()


def chain_entropy(sigma: torch.Tensor, terms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B]: entropy of the scored (``terms`` [K, H]; None: all) Gaussian transitions with noise
    levels ``sigma`` [B, K, H, A]."""
    return scored_sum(gaussian_entropy(sigma), terms).float()


def masked_mean(err: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-step errors [B, H] over the steps ``pad`` [B, H] does not mark (past an episode end)."""
    if pad is None:
        return err.mean()
    keep = (~pad.bool()).to(err.dtype)
    return (err * keep).sum() / keep.sum().clamp_min(1.0)


def sample_chain(x0: torch.Tensor, num_steps: int, transition, noise, terms: Optional[torch.Tensor] = None,
                 stochastic: Optional[Sequence[bool]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K Euler steps from ``x0`` [B, H, A]: x_{k+1} ~ N(mean_k, sigma_k^2) where ``stochastic[k]``
    (None: every step), else x_{k+1} = mean_k; ``terms`` [K, H] as in ``scored_terms`` (None: all).
    ``stochastic`` is plain Python (``terms.any(1)`` read once by the caller), so that the loop
    never reads the device (CUDA graph capture).

    ``transition(x, step)`` gives (mean, sigma) of step ``step`` [B]; ``noise()`` a fresh standard
    normal draw like ``x0``. Returns the chain [B, K+1, H, A] and its log-probability [B] over the
    scored terms, summed in float64 so that it equals ``chain_log_prob`` of the same chain (the
    batched evaluation)."""
    B = x0.shape[0]
    x, chain = x0, [x0]
    stochastic = [True] * num_steps if stochastic is None else list(stochastic)
    log_prob = torch.zeros(B, dtype=torch.float64, device=x0.device)
    for k in range(num_steps):
        mean, sigma = transition(x, torch.full((B,), k, device=x0.device))
        if not stochastic[k]:
            x = mean
        else:
            x = mean + sigma * noise()
            log_p = gaussian_log_prob(x, mean, sigma)
            log_prob = log_prob + scored_sum(log_p[:, None], None if terms is None else terms[k:k + 1])
        chain.append(x)
    return torch.stack(chain, 1), log_prob.float()
