"""V-trace against the paper's sum formula and, on-policy, against GAE / n-step returns."""
import numpy as np
import pytest
import torch

from learner.vtrace import vtrace


def vtrace_reference(behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts,
                     rho_bar, c_bar, lam):
    """Direct transcription of IMPALA eq. (1), float64 double loops:
    vs_t = V(x_t) + sum_{s=t}^{T-1} (prod_{i=t}^{s-1} gamma_i c_i) delta_s V."""
    T, B = rewards.shape
    ratio = np.exp(target_logp - behaviour_logp)
    rho = np.minimum(rho_bar, ratio)
    c = lam * np.minimum(c_bar, ratio)
    v_ext = np.concatenate([values, bootstrap_value[None]], 0)  # V(x_0) .. V(x_T)
    vs = np.zeros((T + 1, B))
    vs[T] = bootstrap_value
    for b in range(B):
        for t in range(T):
            total = 0.0
            for s in range(t, T):
                trace = 1.0
                for i in range(t, s):
                    trace *= discounts[i, b] * c[i, b]
                delta = rho[s, b] * (rewards[s, b] + discounts[s, b] * v_ext[s + 1, b] - v_ext[s, b])
                total += trace * delta
            vs[t, b] = v_ext[t, b] + total
    pg_adv = rho * (rewards + discounts * vs[1:] - values)
    return vs[:T], pg_adv


def random_inputs(T, B, seed, logp_scale=0.5, done_prob=0.2, gamma=0.97):
    rng = np.random.default_rng(seed)
    behaviour_logp = rng.normal(size=(T, B)) * logp_scale
    target_logp = behaviour_logp + rng.normal(size=(T, B)) * logp_scale
    rewards = rng.normal(size=(T, B))
    values = rng.normal(size=(T, B))
    bootstrap_value = rng.normal(size=(B,))
    dones = rng.random((T, B)) < done_prob
    discounts = gamma * (1.0 - dones)
    return behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts


def as_torch(arrays, dtype=torch.float64):
    return [torch.tensor(a, dtype=dtype) for a in arrays]


@pytest.mark.parametrize("rho_bar,c_bar,lam", [(1.0, 1.0, 1.0), (1.0, 0.9, 0.95), (2.0, 1.0, 0.8), (0.5, 0.3, 1.0)])
def test_vtrace_matches_paper_sum_formula(rho_bar, c_bar, lam):
    inputs = random_inputs(T=7, B=5, seed=int(rho_bar * 100 + c_bar * 10 + lam * 1000))
    vs, pg_adv = vtrace(*as_torch(inputs), rho_bar=rho_bar, c_bar=c_bar, lam=lam)
    ref_vs, ref_pg_adv = vtrace_reference(*inputs, rho_bar=rho_bar, c_bar=c_bar, lam=lam)
    np.testing.assert_allclose(vs.numpy(), ref_vs, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pg_adv.numpy(), ref_pg_adv, rtol=1e-10, atol=1e-10)
    # truncation is active in these inputs, so this is not the trivial on-policy case
    ratio = np.exp(inputs[1] - inputs[0])
    assert (ratio > min(rho_bar, c_bar)).any()


def test_vtrace_float32_matches_reference():
    inputs = random_inputs(T=16, B=8, seed=3)
    vs, pg_adv = vtrace(*as_torch(inputs, torch.float32), rho_bar=1.0, c_bar=1.0, lam=0.95)
    ref_vs, ref_pg_adv = vtrace_reference(*inputs, rho_bar=1.0, c_bar=1.0, lam=0.95)
    np.testing.assert_allclose(vs.numpy(), ref_vs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pg_adv.numpy(), ref_pg_adv, rtol=1e-4, atol=1e-4)


def gae_reference(rewards, values, bootstrap_value, discounts, lam):
    """CleanRL-style GAE(lambda) written with per-step discounts (discount_t = gamma * (1 - done_t))."""
    T, _ = rewards.shape
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(bootstrap_value)
    for t in reversed(range(T)):
        next_value = bootstrap_value if t == T - 1 else values[t + 1]
        delta = rewards[t] + discounts[t] * next_value - values[t]
        last = delta + discounts[t] * lam * last
        advantages[t] = last
    return advantages


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_on_policy_vs_equals_gae_returns(lam):
    behaviour_logp, _, rewards, values, bootstrap_value, discounts = random_inputs(T=10, B=4, seed=11)
    inputs = (behaviour_logp, behaviour_logp.copy(), rewards, values, bootstrap_value, discounts)
    vs, pg_adv = vtrace(*as_torch(inputs), rho_bar=1.0, c_bar=1.0, lam=lam)
    advantages = gae_reference(rewards, values, bootstrap_value, discounts, lam)
    np.testing.assert_allclose(vs.numpy(), values + advantages, rtol=1e-10, atol=1e-10)
    # the policy-gradient advantage is the one-step TD error against the V-trace target
    vs_tp1 = np.concatenate([vs.numpy()[1:], bootstrap_value[None]], 0)
    np.testing.assert_allclose(pg_adv.numpy(), rewards + discounts * vs_tp1 - values, atol=1e-10)


def test_on_policy_lambda_one_gives_n_step_returns():
    """With lam = 1 and no dones, vs_t is the discounted reward sum bootstrapped at the segment end."""
    T, B, gamma = 6, 3, 0.9
    behaviour_logp, _, rewards, values, bootstrap_value, _ = random_inputs(T, B, seed=5)
    discounts = np.full((T, B), gamma)
    vs, _ = vtrace(*as_torch((behaviour_logp, behaviour_logp, rewards, values, bootstrap_value, discounts)),
                   rho_bar=1.0, c_bar=1.0, lam=1.0)
    for t in range(T):
        n = T - t
        expected = sum(gamma ** k * rewards[t + k] for k in range(n)) + gamma ** n * bootstrap_value
        np.testing.assert_allclose(vs.numpy()[t], expected, rtol=1e-10)


def test_done_cuts_bootstrap():
    """A done at step t makes vs_t = V_t + rho_t (r_t - V_t): nothing from after the boundary leaks in."""
    T, B = 4, 2
    behaviour_logp, target_logp, rewards, values, bootstrap_value, _ = random_inputs(T, B, seed=7)
    discounts = np.full((T, B), 0.99)
    discounts[1] = 0.0
    vs, _ = vtrace(*as_torch((behaviour_logp, target_logp, rewards, values, bootstrap_value, discounts)))
    rho = np.minimum(1.0, np.exp(target_logp[1] - behaviour_logp[1]))
    np.testing.assert_allclose(vs.numpy()[1], values[1] + rho * (rewards[1] - values[1]), rtol=1e-10)


def test_no_gradient_and_extreme_ratios_are_finite():
    T, B = 5, 3
    behaviour_logp = torch.zeros(T, B)
    target_logp = torch.full((T, B), 500.0, requires_grad=True)  # exp overflows to inf
    values = torch.randn(T, B, requires_grad=True)
    vs, pg_adv = vtrace(behaviour_logp, target_logp, torch.randn(T, B), values, torch.randn(B),
                        torch.full((T, B), 0.99))
    assert not vs.requires_grad and not pg_adv.requires_grad
    assert torch.isfinite(vs).all() and torch.isfinite(pg_adv).all()
