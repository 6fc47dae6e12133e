"""actors/inference_server.py on the CPU: env worker processes + the batching server thread.

With ``full_batch`` every batch holds every env worker in index order, so a lockstep replay in
this process (the same FakeTwinEnv seeds, ``policy.sample`` on the stacked batch with a generator
of the same seed) must give the very segments the workers sent: same chains, log-probabilities,
values, tokens, images and rewards (incl. the gamma * V bootstrap on time-limit truncation)."""
import numpy as np
import pytest
import torch

from actors.inference_server import InferenceServer, RequestSlots, slot_layout, worker_cores
from benchmarks.fake_env import FakeTwinEnv
from common.config import load_config
from common.device import autocast
from common.policy import make_policy

FAKE = "benchmarks.fake_env:FakeTwinEnv"
ENV_CFG = {"image_size": 32, "max_episode_steps": 10}
SEED, GSEED, GAMMA, T = 7, 3, 0.99, 3


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return make_policy(load_config("config", ["policy=tiny"]).policy).eval()


def replay(policy, num_envs: int, num_steps: int):
    """What the workers must have produced: lockstep batches in env order."""
    envs = [FakeTwinEnv(ENV_CFG, False, SEED + 100_003 * i) for i in range(num_envs)]
    first = [e.reset() for e in envs]
    obs, instr = [o for o, _ in first], [s for _, s in first]
    gen = torch.Generator().manual_seed(GSEED)
    k = policy.exec_horizon
    steps = []
    for _ in range(num_steps):
        tokens = policy.tokenize(instr)
        batch = {"image": torch.from_numpy(np.stack([o["image"] for o in obs])),
                 "state": torch.from_numpy(np.stack([o["state"] for o in obs])), "tokens": tokens}
        with torch.no_grad():
            out = policy.sample(batch, generator=gen)
        results = [e.run_chunk(out.actions[i, :k].numpy().astype(np.float32)) for i, e in enumerate(envs)]
        trunc = [i for i, r in enumerate(results) if r.truncated]
        rewards = [r.reward for r in results]
        if trunc:
            fb = {"image": torch.from_numpy(np.stack([results[i].final_obs["image"] for i in trunc])),
                  "state": torch.from_numpy(np.stack([results[i].final_obs["state"] for i in trunc])),
                  "tokens": policy.tokenize([instr[i] for i in trunc])}
            with torch.no_grad():
                v = policy.value(fb)
            for j, i in enumerate(trunc):
                rewards[i] += GAMMA * float(v[j])
        steps.append(dict(image=[o["image"] for o in obs], tokens=tokens.numpy(), chain=out.chain.numpy(),
                          logp=out.log_prob.numpy(), value=out.value.numpy(), reward=rewards,
                          done=[r.done for r in results]))
        obs, instr = [r.obs for r in results], [r.instruction for r in results]
    return steps


def test_slots_roundtrip():
    layout = slot_layout(3, (8, 8), 8, 16, 4, 2)
    slots = RequestSlots.create(layout)
    try:
        other = RequestSlots.attach(slots.shm.name, layout)
        other["image"][1] = 7
        other["chain"][2] = 1.5
        assert slots["image"][1].sum() == 7 * 8 * 8 * 3 and slots["image"][0].sum() == 0
        assert np.all(slots["chain"][2] == 1.5)
        other.close()
    finally:
        slots.close()


def test_server_matches_lockstep_sample(policy):
    num_envs, segments_per_env = 2, 3
    srv = InferenceServer(policy, ENV_CFG, num_envs, rollout_steps=T, gamma=GAMMA, seed=SEED,
                          generator_seed=GSEED, full_batch=True, env_factory=FAKE)
    try:
        srv.set_version(5)
        srv.start()
        got: dict[int, list] = {i: [] for i in range(num_envs)}
        while min(len(v) for v in got.values()) < segments_per_env:
            item = srv.get_segment(timeout=30)
            assert item is not None, f"no segment; server errors: {srv.errors}"
            arrays, meta = item
            got[meta["env_index"]].append((arrays, meta))
        stats = srv.stats.summary()
    finally:
        srv.close()
    assert not srv.errors
    # batching happened: every sample batch held both env workers
    assert stats["batch_p50"] == num_envs and stats["batch_max"] == num_envs
    assert stats["value_requests"] > 0  # episodes of 10 steps with k=4: truncations were bootstrapped

    ref = replay(policy, num_envs, segments_per_env * T + 1)
    for i in range(num_envs):
        for s, (arrays, meta) in enumerate(got[i][:segments_per_env]):
            assert meta["version"] == 5
            for t in range(T):
                r = ref[s * T + t]
                np.testing.assert_array_equal(arrays["image"][t], r["image"][i])
                np.testing.assert_array_equal(arrays["tokens"][t], r["tokens"][i])
                np.testing.assert_allclose(arrays["chain"][t], r["chain"][i], rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(arrays["behaviour_logp"][t], r["logp"][i], rtol=1e-5, atol=1e-4)
                np.testing.assert_allclose(arrays["behaviour_value"][t], r["value"][i], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(arrays["reward"][t], r["reward"][i], rtol=1e-5, atol=1e-6)
                assert bool(arrays["done"][t]) == r["done"][i]
            # bootstrap observation = the first observation of the next segment
            np.testing.assert_array_equal(arrays["image"][T], ref[(s + 1) * T]["image"][i])
            # the stored chain's log-probability under the same weights is the behaviour one
            with torch.no_grad():
                ev = policy.evaluate({"image": torch.from_numpy(arrays["image"][:T]),
                                      "state": torch.from_numpy(arrays["state"][:T]),
                                      "tokens": torch.from_numpy(arrays["tokens"][:T]).long()},
                                     torch.from_numpy(arrays["chain"]))
            np.testing.assert_allclose(ev.log_prob.numpy(), arrays["behaviour_logp"], rtol=1e-4, atol=1e-2)


def collect(srv, n: int) -> list:
    """``n`` segments from a started server."""
    out = []
    while len(out) < n:
        item = srv.get_segment(timeout=30)
        assert item is not None, f"no segment; server errors: {srv.errors}"
        out.append(item)
    return out


def test_worker_cores():
    assert worker_cores(None, 2, [0, 1]) == [None, None]
    assert worker_cores("auto", 3, [4, 2]) == [[2], [4], [2]]
    assert worker_cores([5, 7], 3, [0]) == [[5], [7], [5]]
    for bad in ("all", []):
        with pytest.raises(ValueError):
            worker_cores(bad, 2, [0])


def test_pinned_profiled_server(policy):
    """cpu_affinity=auto: worker i runs on the i-th allowed core only; profile=true: every worker's
    loop sections arrive with its segments, the server's own sections and batch sizes are counted."""
    import os

    allowed = sorted(os.sched_getaffinity(0))
    srv = InferenceServer(policy, dict(ENV_CFG, step_cost_s=0.001), 2, rollout_steps=T, gamma=GAMMA, seed=SEED,
                          env_factory=FAKE, cpu_affinity="auto", profile=True)
    try:
        assert srv.worker_cores == [[allowed[0]], [allowed[1 % len(allowed)]]]
        srv.start()
        collect(srv, 4)
        steps, w = srv.worker_totals()
    finally:
        srv.close()
    assert steps >= srv.stats.env_steps > 0  # executed >= shipped
    # each worker published its totals with its latest request, at most one chunk ago
    assert steps - 2 * policy.exec_horizon <= w["physics"][1] <= steps
    assert w["physics"][0] >= 0.001 * w["physics"][1]  # FakeTwinEnv sleeps 1 ms a step
    for k in ("ipc_send", "wait_server", "bookkeeping", "segment_send"):
        assert w[k][1] > 0, k
    assert srv.stats.laps["sample"][1] == sum(c for b, (_, c) in srv.stats.infer_by_size.items() if b) > 0
    assert set(srv.stats.laps) >= {"wait", "gather", "prep", "writeback", "answer"}


def test_bf16_server_log_probs_are_float32_and_a_bf16_evaluate_agrees(policy):
    """autocast_dtype=bfloat16: chains and log-probs come back float32, and the learner's evaluate
    under the same autocast gives the stored log-prob within 0.05 (a ratio within 5 %, a quarter of
    PPO's 0.2 clip). A float32 evaluate differs by more: the option is in effect, and the learner
    must share the dtype (actor.server.autocast_dtype follows learner.autocast_dtype)."""
    srv = InferenceServer(policy, ENV_CFG, 2, rollout_steps=T, gamma=GAMMA, seed=SEED, env_factory=FAKE,
                          autocast_dtype="bfloat16")
    try:
        srv.start()
        segments = collect(srv, 4)
    finally:
        srv.close()
    gap_bf16, gap_fp32 = [], []
    for arrays, _ in segments:
        assert arrays["behaviour_logp"].dtype == np.float32 and arrays["chain"].dtype == np.float32
        obs = {"image": torch.from_numpy(arrays["image"][:T]), "state": torch.from_numpy(arrays["state"][:T]),
               "tokens": torch.from_numpy(arrays["tokens"][:T]).long()}
        chain, logp = torch.from_numpy(arrays["chain"]), torch.from_numpy(arrays["behaviour_logp"])
        with torch.no_grad():
            with autocast(policy.device, torch.bfloat16):
                gap_bf16.append((policy.evaluate(obs, chain).log_prob - logp).abs().max().item())
            gap_fp32.append((policy.evaluate(obs, chain).log_prob - logp).abs().max().item())
    assert max(gap_bf16) <= 0.05, gap_bf16
    assert max(gap_fp32) > 0.05, gap_fp32


def test_actor_server_mode_dry_run(tmp_path):
    """The Actor's `actor.inference=server` switch: free-running workers, segments counted."""
    from actors.main import Actor

    cfg = load_config("config", [
        "policy=tiny", "device=cpu", "actor.inference=server", "actor.num_envs=3", "actor.rollout_steps=2",
        "actor.dry_run=true", "actor.max_segments=6", f"actor.server.env_factory={FAKE}",
        "+env.step_cost_s=0.001", "env.image_size=32", "env.max_episode_steps=10",
        "transport.request_timeout_ms=50", "transport.heartbeat_interval_s=100",
        *[f"transport.{k}_endpoint=ipc://{tmp_path}/{k}.ipc" for k in ("data", "weights", "control")]])
    actor = Actor(cfg)
    assert actor.server is not None and actor.pool is None
    assert actor.run() == 0
    s = actor.server.stats.summary()
    assert actor.stats["segments"] >= 6 and actor.stats["env_steps"] >= 6 * 2
    assert s["requests"] >= 6 * 2 and s["batch_max"] >= 1
