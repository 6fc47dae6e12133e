"""An exponential moving average of a policy's weights (Diffusion Policy, pi0): the policy that is
evaluated, saved and (in Stage II's filtered BC) broadcast, while the optimiser trains the raw weights."""
from __future__ import annotations

import copy

import torch


def as_ema(policy):
    """``policy`` made an EMA holder: no gradients, eval mode (a fresh copy, or one loaded from disk)."""
    return policy.requires_grad_(False).eval()


def make_ema(policy, decay: float):
    """A frozen copy of ``policy`` tracking an exponential moving average of its weights; None if decay is 0."""
    if decay <= 0:
        return None
    return as_ema(copy.deepcopy(policy))


@torch.no_grad()
def update_ema(ema, policy, decay: float, step: int) -> None:
    """ema <- d * ema + (1 - d) * policy, with d warmed up as min(decay, (1 + step) / (10 + step))."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in policy.parameters()], 1.0 - d)
    for b_ema, b in zip(ema.buffers(), policy.buffers()):
        b_ema.copy_(b)
