"""The policy interface on the compact VLA (tiny preset, CPU)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.config import load_policy_preset
from common.policy import CompactVLA, Normalizer, load_policy, make_policy
from common.policy import flow
from paths import REPO_ROOT

POLICY_CONFIGS = REPO_ROOT / "configs" / "policy"
INSTRUCTIONS = ["put the red cube in the bowl", "PICK UP the green block", "", "place it in the bowl, please"]

STATS = {  # LeRobot meta.stats layout; image features must be ignored
    "action": {"mean": np.linspace(-0.1, 0.1, 7), "std": np.linspace(0.01, 0.5, 7),
               "min": -np.ones(7), "max": np.ones(7)},
    "observation.state": {"mean": torch.linspace(-1, 1, 8), "std": [0.5] * 8},
    "observation.images.front": {"mean": np.zeros((3, 1, 1)), "std": np.ones((3, 1, 1))},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CPU they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_cfg(*dotlist: str) -> dict:
    return load_policy_preset("tiny", dotlist)


def make_tiny(*dotlist: str, stats=STATS, seed: int = 0) -> CompactVLA:
    torch.manual_seed(seed)
    policy = make_policy(tiny_cfg(*dotlist), stats=stats).eval()
    if policy.expert.noise_out is not None:  # make the learned sigma depend on the input
        with torch.no_grad():
            policy.expert.noise_out.weight.normal_(std=0.5)
    return policy


def make_obs(policy, batch: int, seed: int = 0, hw=(48, 80)) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (batch, *hw, 3), generator=g, dtype=torch.uint8),
        "tokens": policy.tokenize([INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]),
        "state": torch.randn(batch, 8, generator=g),
    }


def rows(obs: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in obs.items()}


@pytest.mark.parametrize("mode", ["learned", "scheduled"])
def test_sample_log_prob_equals_evaluate(mode):
    policy = make_tiny(f"noise.mode={mode}")
    obs = make_obs(policy, 6)
    with torch.no_grad():
        out = policy.sample(obs, generator=torch.Generator().manual_seed(1))
        ev = policy.evaluate(obs, out.chain)
    K, H = policy.num_denoise_steps, policy.chunk_size
    assert out.chain.shape == (6, K + 1, H, 7) and out.actions.shape == (6, H, 7)
    torch.testing.assert_close(out.log_prob, ev.log_prob, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.value, ev.value, atol=1e-5, rtol=0)
    # the env action is the un-normalised, clipped last chain element
    expected = policy.normalizer.unnormalize("action", out.chain[:, -1].clamp(-policy.action_clip, policy.action_clip))
    torch.testing.assert_close(out.actions, expected)


@pytest.mark.parametrize("steps,score", [("all", "executed"), ("last", "chunk"), ("last", "executed")])
def test_scored_terms_of_the_chain(steps, score):
    """noise.stochastic_steps / noise.score: sample and evaluate agree on the same terms, the
    deterministic steps are the plain Euler step, and the log-prob is exactly the sum of the
    scored Gaussian terms."""
    policy = make_tiny(f"noise.stochastic_steps={steps}", f"noise.score={score}")
    K, H, k = policy.num_denoise_steps, policy.chunk_size, policy.exec_horizon
    assert k < H  # the tiny preset executes part of its chunk, so "executed" drops terms
    obs = make_obs(policy, 5)
    with torch.no_grad():
        out = policy.sample(obs, generator=torch.Generator().manual_seed(2))
        ev = policy.evaluate(obs, out.chain)
        mean, sigma = policy.chain_transitions(policy.encode(obs), out.chain)
    torch.testing.assert_close(out.log_prob, ev.log_prob, atol=1e-4, rtol=0)
    terms = torch.ones(K, H, dtype=torch.bool)
    if steps == "last":
        terms[:-1] = False
        torch.testing.assert_close(out.chain[:, 1:K], mean[:, :K - 1], atol=1e-5, rtol=0)  # no noise added
    if score == "executed":
        terms[-1, k:] = False
    assert torch.equal(policy.chain_terms, terms)
    z = (out.chain[:, 1:] - mean) / sigma
    by_hand = (-0.5 * z ** 2 - sigma.log() - 0.5 * math.log(2 * math.pi)) * terms[None, :, :, None]
    torch.testing.assert_close(ev.log_prob, by_hand.double().sum((1, 2, 3)).float(), atol=1e-3, rtol=0)
    expected_entropy = (terms[None, :, :, None] * (0.5 * (math.log(2 * math.pi) + 1) + sigma.log())).sum((1, 2, 3))
    torch.testing.assert_close(ev.entropy, expected_entropy, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="noise.stochastic_steps='first'"):
        make_tiny("noise.stochastic_steps=first")


def test_no_stochastic_step_samples_the_ode_from_a_random_start():
    """noise.stochastic_steps=none (filtered BC's actors): a sample is act() from the same random x_0,
    nothing is scored, and two draws differ (the randomness is the start, not added noise)."""
    policy = make_tiny("noise.stochastic_steps=none")
    obs = make_obs(policy, 4)
    with torch.no_grad():
        out = policy.sample(obs, generator=torch.Generator().manual_seed(3))
        ode = policy.act(obs, generator=torch.Generator().manual_seed(3))
        other = policy.sample(obs, generator=torch.Generator().manual_seed(4))
        ev = policy.evaluate(obs, out.chain)
    assert not policy.chain_terms.any() and policy.stochastic_steps == (False,) * policy.num_denoise_steps
    torch.testing.assert_close(out.actions, ode, atol=1e-5, rtol=0)
    assert torch.equal(out.log_prob, torch.zeros(4)) and torch.equal(ev.log_prob, torch.zeros(4))
    assert not torch.allclose(out.actions, other.actions)


def test_sampler_draws_from_the_transitions_it_scores():
    policy = make_tiny()
    obs = make_obs(policy, 64)
    with torch.no_grad():
        chain = policy.sample(obs).chain
        mean, sigma = policy.chain_transitions(policy.encode(obs), chain)
    z = (chain[:, 1:] - mean) / sigma
    assert sigma.std() > 0.01  # the learned sigma varies, so a wrong sigma would show
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_sample_works_with_grad():
    policy = make_tiny()
    out = policy.sample(make_obs(policy, 3))
    out.log_prob.sum().backward()
    grads = [p.grad for p in policy.expert.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("mode", ["learned", "scheduled"])
def test_log_prob_gradient_finite_and_nonzero(mode):
    policy = make_tiny(f"noise.mode={mode}")
    obs = make_obs(policy, 4)
    with torch.no_grad():
        chain = policy.sample(obs).chain
    policy.evaluate(obs, chain).log_prob.sum().backward()
    for name, p in policy.named_parameters():
        if name.startswith("value_head") or name == "encoder.no_state":  # not on the log-prob path here
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"zero gradient for {name}"


def test_entropy_matches_gaussian_closed_form():
    n = None
    entropies = {}
    for s in (0.05, 0.2):
        policy = make_tiny("noise.mode=scheduled", f"noise.sigma_min={s}", f"noise.sigma_max={s}")
        obs = make_obs(policy, 3)
        with torch.no_grad():
            ent = policy.evaluate(obs, policy.sample(obs).chain).entropy
        n = policy.num_denoise_steps * policy.chunk_size * policy.action_dim
        torch.testing.assert_close(ent, torch.full((3,), n * (0.5 * math.log(2 * math.pi * math.e) + math.log(s))))
        entropies[s] = ent
    # raising sigma raises the entropy by exactly n * log(sigma2 / sigma1)
    torch.testing.assert_close(entropies[0.2] - entropies[0.05], torch.full((3,), n * math.log(0.2 / 0.05)))

    # scheduled linear sigma_max -> sigma_min over the K steps
    policy = make_tiny("noise.mode=scheduled", "noise.sigma_min=0.05", "noise.sigma_max=0.25")
    obs = make_obs(policy, 2)
    with torch.no_grad():
        ent = policy.evaluate(obs, policy.sample(obs).chain).entropy
    sig = np.linspace(0.25, 0.05, policy.num_denoise_steps)
    closed = policy.chunk_size * 7 * np.sum(0.5 * np.log(2 * np.pi * np.e * sig ** 2))
    torch.testing.assert_close(ent, torch.full((2,), float(closed)))


def test_learned_sigma_entropy_follows_noise_head_and_bounds():
    policy = make_tiny()
    obs = make_obs(policy, 2)
    with torch.no_grad():
        chain = policy.sample(obs).chain
    n = policy.num_denoise_steps * policy.chunk_size * 7
    previous = -float("inf")
    for bias, sigma in [(-50.0, 0.05), (-1.0, None), (0.0, None), (1.0, None), (50.0, 0.25)]:
        with torch.no_grad():
            policy.expert.noise_out.weight.zero_()
            policy.expert.noise_out.bias.fill_(bias)
        ent = policy.evaluate(obs, chain).entropy.detach()
        if sigma is None:
            sigma = 0.05 + 0.2 / (1 + math.exp(-bias))
        torch.testing.assert_close(ent, torch.full((2,), n * (0.5 * math.log(2 * math.pi * math.e) + math.log(sigma))))
        assert (ent > previous).all()
        previous = ent


def test_sft_loss_overfits_a_few_chunks():
    policy = make_tiny()
    obs = make_obs(policy, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    std, mean = torch.as_tensor(STATS["action"]["std"]).float(), torch.as_tensor(STATS["action"]["mean"]).float()
    demo = torch.randn(4, policy.chunk_size, 7, generator=g) * std + mean  # env units
    pad = torch.zeros(4, policy.chunk_size, dtype=torch.bool)
    pad[0, -3:] = True  # padded steps of a short episode: excluded from the loss
    big = {k: v.repeat(8, *[1] * (v.dim() - 1)) for k, v in obs.items()}  # low-variance evaluation batch
    train_obs = {k: v[:16] for k, v in big.items()}

    def eval_loss():
        with torch.no_grad():
            return policy.sft_loss(big, demo.repeat(8, 1, 1), pad.repeat(8, 1), generator=torch.Generator().manual_seed(5)).item()

    def act_error():
        return ((policy.act(obs) - demo) / std).pow(2)[~pad].mean().item()

    loss0, err0 = eval_loss(), act_error()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(200):
        loss = policy.sft_loss(train_obs, demo.repeat(4, 1, 1), pad.repeat(4, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss1, err1 = eval_loss(), act_error()
    assert loss1 < loss0 / 8, (loss0, loss1)  # ~14x here; the t -> 1 end keeps a floor
    assert err1 < err0 / 30, (err0, err1)  # the ODE now reproduces the demonstrated chunks


def test_sft_loss_is_the_mean_over_unpadded_steps():
    policy = make_tiny()
    obs = make_obs(policy, 2)
    demo = torch.randn(2, policy.chunk_size, 7)
    pad = torch.zeros(2, policy.chunk_size, dtype=torch.bool)
    pad[0, -3:] = True
    pad[1, 1:] = True

    def g():
        return torch.Generator().manual_seed(0)

    err = policy.sft_errors(obs, demo, generator=g())
    assert err.shape == (2, policy.chunk_size) and (err > 0).all()
    torch.testing.assert_close(policy.sft_loss(obs, demo, pad, generator=g()), err[~pad].mean())
    torch.testing.assert_close(policy.sft_loss(obs, demo, None, generator=g()), err.mean())
    assert abs(err[~pad].mean().item() - err.mean().item()) > 1e-3


def test_save_load_gives_identical_outputs(tmp_path):
    policy = make_tiny()
    obs = make_obs(policy, 3)
    policy.save(str(tmp_path / "ckpt"))
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "model.safetensors", "stats.json"}
    loaded = load_policy(str(tmp_path / "ckpt"))
    assert isinstance(loaded, CompactVLA) and loaded.cfg == policy.cfg
    assert json.loads((tmp_path / "ckpt" / "stats.json").read_text())["action"]["std"] == pytest.approx(
        STATS["action"]["std"].tolist())
    assert torch.equal(policy.act(obs), loaded.act(obs))
    with torch.no_grad():
        a = policy.sample(obs, generator=torch.Generator().manual_seed(7))
        b = loaded.sample(obs, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.chain, b.chain) and torch.equal(a.log_prob, b.log_prob) and torch.equal(a.actions, b.actions)
    assert torch.equal(policy.value(obs), loaded.value(obs))
    # the normaliser's statistics came back from the weights file alone
    assert torch.equal(loaded.normalizer.action_std, policy.normalizer.action_std)
    assert loaded.normalizer.has_stats.tolist() == [1.0, 1.0]


def test_load_with_overrides_changes_the_chain_scoring_not_the_weights(tmp_path):
    """Stage II's learner.policy_noise: a saved Stage I policy loaded with other noise.* settings."""
    policy = make_tiny()
    policy.save(str(tmp_path / "ckpt"))
    loaded = load_policy(str(tmp_path / "ckpt"), overrides={"noise": {"stochastic_steps": "last", "score": None}})
    assert loaded.cfg["noise"]["stochastic_steps"] == "last" and loaded.cfg["noise"]["score"] == policy.cfg["noise"]["score"]
    assert loaded.stochastic_steps == (False,) * (policy.num_denoise_steps - 1) + (True,)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in policy.state_dict().items())
    obs = make_obs(policy, 2)
    assert torch.equal(policy.act(obs), loaded.act(obs))  # the deterministic policy is the same
    loaded.save(str(tmp_path / "stage2"))  # and a Stage II checkpoint keeps the setting
    assert load_policy(str(tmp_path / "stage2")).stochastic_steps == loaded.stochastic_steps


def test_results_do_not_depend_on_batch_composition():
    policy = make_tiny()
    obs = make_obs(policy, 5)
    with torch.no_grad():
        chain = policy.sample(obs).chain
        full = policy.evaluate(obs, chain)
        acts = policy.act(obs)
        for i in range(5):
            one = policy.evaluate(rows(obs, i), chain[i:i + 1])
            torch.testing.assert_close(one.log_prob, full.log_prob[i:i + 1], atol=1e-4, rtol=0)
            torch.testing.assert_close(one.entropy, full.entropy[i:i + 1], atol=1e-4, rtol=0)
            torch.testing.assert_close(one.value, full.value[i:i + 1], atol=1e-5, rtol=0)
            torch.testing.assert_close(policy.act(rows(obs, i)), acts[i:i + 1], atol=1e-5, rtol=0)


def test_normalizer_from_lerobot_stats_round_trips():
    norm = Normalizer.from_lerobot_stats(STATS, action_dim=7, state_dim=8, eps=1e-6)
    assert norm.has_stats.tolist() == [1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    mean, std = torch.as_tensor(STATS["action"]["mean"]).float(), torch.as_tensor(STATS["action"]["std"]).float()
    x = torch.randn(4096, 7, generator=g) * std + mean
    z = norm.normalize("action", x)
    assert z.mean(0).abs().max() < 0.1 and (z.std(0) - 1).abs().max() < 0.1
    torch.testing.assert_close(norm.unnormalize("action", z), x, atol=1e-5, rtol=1e-5)
    s = torch.randn(5, 8)
    torch.testing.assert_close(norm.normalize("state", s), (s - torch.linspace(-1, 1, 8)) / (0.5 + 1e-6))
    assert norm.to_lerobot_stats()["action"]["min"] == [-1.0] * 7

    ident = Normalizer.from_lerobot_stats(None, 7, 8)
    assert ident.has_stats.tolist() == [0.0, 0.0]
    torch.testing.assert_close(ident.normalize("action", x), x, atol=1e-5, rtol=1e-5)

    with pytest.raises(ValueError, match="expected 7"):
        Normalizer.from_lerobot_stats({"action": {"mean": np.zeros(6), "std": np.ones(6)}}, 7, 8)
    with pytest.raises(ValueError, match="std"):
        Normalizer.from_lerobot_stats({"action": {"mean": np.zeros(7)}}, 7, 8)


def test_policy_normalises_sft_targets_and_state():
    with_stats = make_tiny()
    without = make_tiny(stats=None)
    without.load_state_dict({k: v for k, v in with_stats.state_dict().items() if not k.startswith("normalizer")},
                            strict=False)
    obs = make_obs(with_stats, 3)
    demo = torch.randn(3, with_stats.chunk_size, 7)
    norm = with_stats.normalizer
    obs_normed = dict(obs, state=norm.normalize("state", obs["state"]))
    a = with_stats.sft_loss(obs, norm.unnormalize("action", demo), generator=torch.Generator().manual_seed(0))
    b = without.sft_loss(obs_normed, demo, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_get_set_weights_strict():
    src, dst = make_tiny(seed=0), make_tiny(seed=1)
    obs = make_obs(src, 2)
    weights = src.get_weights()
    assert all(isinstance(w, np.ndarray) and w.dtype == np.float32 for w in weights.values())
    assert not torch.equal(src.act(obs), dst.act(obs))
    dst.set_weights(weights)
    assert torch.equal(src.act(obs), dst.act(obs))

    before = dst.get_weights()
    bad = dict(weights)
    bad.pop("expert.velocity_out.bias")
    bad["bogus.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"expert\.velocity_out\.bias.*bogus\.weight"):
        dst.set_weights(bad)
    bad = dict(weights, **{"encoder.readout": np.zeros((1, 1, 3), np.float32)})
    with pytest.raises(ValueError, match=r"encoder\.readout: got \(1, 1, 3\)"):
        dst.set_weights(bad)
    assert all(np.array_equal(before[k], v) for k, v in dst.get_weights().items())  # nothing changed


def test_tokenizer_and_observation_formats():
    policy = make_tiny()
    tok = policy.tokenize(["Put The Cube", "put the cube", "", "x" * 500])
    assert tok.dtype == torch.int64 and tok.shape == (4, policy.token_len)
    assert torch.equal(tok[0], tok[1]) and tok[0, 0] == 1 and tok[0, 13:].eq(0).all()
    assert tok[2, 0] == 1 and tok[2, 1:].eq(0).all() and tok[3].ne(0).all()
    assert policy.tokenizer.decode(tok[0]) == "put the cube"

    obs = make_obs(policy, 2, hw=(480, 640))
    small = dict(obs, image=obs["image"][:, ::8, ::8].contiguous())
    as_int32 = dict(obs, tokens=obs["tokens"].int())
    for o in (obs, small):
        assert policy.act(o).shape == (2, policy.chunk_size, 7)
    torch.testing.assert_close(policy.act(as_int32), policy.act(obs))
    no_state = dict(obs, state=None)
    assert torch.isfinite(policy.value(no_state)).all()


def test_presets_compose_and_have_the_right_size():
    from hydra import compose, initialize_config_dir

    assert set(load_policy_preset("tiny")) == set(load_policy_preset("base"))
    with initialize_config_dir(config_dir=str(POLICY_CONFIGS.parent), version_base=None):
        base = compose(overrides=["+policy=base"]).policy
    assert base.name == "compact_vla" and base.preset == "base"
    with torch.device("meta"):  # count without allocating
        n_base = make_policy(base).num_parameters()
    n_tiny = make_tiny().num_parameters()
    assert 100_000 <= n_tiny <= 300_000 and 10_000_000 <= n_base <= 100_000_000
    p = make_tiny()
    assert (p.chunk_size, p.exec_horizon, p.num_denoise_steps, p.token_len, p.state_dim, p.image_size) == (8, 4, 4, 48, 8, 64)
