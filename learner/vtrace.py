"""V-trace off-policy targets (Espeholt et al. 2018, "IMPALA", section 4.1).

All inputs are time-major: [T, B] (``bootstrap_value`` is [B], the value of the observation after
step T-1). ``discounts`` is ``gamma * (1 - done)``, so a ``done`` step does not bootstrap.

    rho_t   = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t))
    c_t     = lam * min(c_bar, pi(a_t|x_t) / mu(a_t|x_t))
    delta_t = rho_t * (r_t + gamma_t * V(x_{t+1}) - V(x_t))
    vs_t    = V(x_t) + delta_t + gamma_t * c_t * (vs_{t+1} - V(x_{t+1})),   vs_T = V(x_T) = bootstrap
    pg_advantage_t = rho_t * (r_t + gamma_t * vs_{t+1} - V(x_t))

On-policy (pi == mu) with rho_bar, c_bar >= 1, ``vs - V`` is exactly the GAE(lam) advantage.
Targets carry no gradient.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def vtrace(
    behaviour_logp: torch.Tensor,
    target_logp: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    discounts: torch.Tensor,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(vs, pg_advantages)``, both [T, B]."""
    rhos = torch.exp(target_logp - behaviour_logp)  # may be inf for extreme log-ratios: min() below fixes it
    clipped_rhos = torch.clamp(rhos, max=rho_bar)
    cs = lam * torch.clamp(rhos, max=c_bar)

    values_tp1 = torch.cat([values[1:], bootstrap_value[None]], dim=0)
    deltas = clipped_rhos * (rewards + discounts * values_tp1 - values)

    vs_minus_v = torch.empty_like(values)
    acc = torch.zeros_like(bootstrap_value)
    for t in reversed(range(values.shape[0])):
        acc = deltas[t] + discounts[t] * cs[t] * acc
        vs_minus_v[t] = acc
    vs = vs_minus_v + values

    vs_tp1 = torch.cat([vs[1:], bootstrap_value[None]], dim=0)
    pg_advantages = clipped_rhos * (rewards + discounts * vs_tp1 - values)
    return vs, pg_advantages
