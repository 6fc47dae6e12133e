"""Stage I SFT (tandem-sft) and the shared deterministic evaluation.

One tiny SFT run on a twin demo dataset (write_demos, 64x64, short episodes) mixed with a second,
synthetic dataset: policy directory loadable with the pooled dataset statistics, loss going down,
evaluation on the twin and the real proxy, resume continuing the step count. ``evaluate_policy``'s
chunk execution is checked against a scripted stand-in env (no rendering)."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from common.config import load_config
from common.evaluation import evaluate_policy
from common.policy import load_policy, make_policy

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ManiSkill's CPU path

IMG = 64
EPISODE_STEPS = 10
SFT_STEPS, RESUMED_STEPS, LOG_INTERVAL = 60, 70, 10
SYNTHETIC_FRAMES = 12


def write_synthetic_dataset(root, repo_id: str, seed: int = 0):
    """One episode in the twin's schema whose actions and states are offset from the twin's, so that
    pooled statistics differ from either dataset's alone."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from common.dataset_schema import ACTION_KEY, IMAGE_KEY, STATE_KEY, dataset_features

    rng = np.random.default_rng(seed)
    ds = LeRobotDataset.create(repo_id, fps=10, features=dataset_features((IMG, IMG)), root=root, use_videos=False)
    for _ in range(SYNTHETIC_FRAMES):
        ds.add_frame({IMAGE_KEY: rng.integers(0, 256, (IMG, IMG, 3), dtype=np.uint8),
                      STATE_KEY: (rng.normal(size=8) + 0.5).astype(np.float32),
                      ACTION_KEY: (rng.normal(size=7) * 0.02 + 0.01).astype(np.float32),
                      "task": "put the red cube into the bowl"})
    ds.save_episode()
    ds.finalize()
    return root


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    from common.twin import write_demos

    base = tmp_path_factory.mktemp("sft_data")
    env_cfg = load_config("config", [f"env.image_size={IMG}", f"env.max_episode_steps={EPISODE_STEPS}"]).env
    twin = write_demos(env_cfg, base / "twin", "tandem/twin_demos", 2, seed=0, keep_failed=True, progress=False)
    other = write_synthetic_dataset(base / "other", "tandem/other")
    return [{"repo_id": "tandem/twin_demos", "root": str(twin), "weight": 1.0},
            {"repo_id": "tandem/other", "root": str(other), "weight": 0.5}]


def sft_args(run_dir, datasets, steps, eval_episodes):
    items = ", ".join(f"{{repo_id: {d['repo_id']}, root: '{d['root']}', weight: {d['weight']}}}" for d in datasets)
    return [f"run_dir={run_dir}", "policy=tiny", "device=cpu", "sft.torch_threads=1", f"env.image_size={IMG}",
            f"env.max_episode_steps={EPISODE_STEPS}", f"sft.datasets=[{items}]", f"sft.steps={steps}",
            "sft.batch_size=16", "sft.lr=1e-3", "sft.warmup_steps=0", "sft.ema_decay=0", "sft.lr_schedule=constant", f"sft.log_interval={LOG_INTERVAL}", "sft.eval_interval=0",
            f"sft.eval_episodes={eval_episodes}", "sft.checkpoint_interval=25"]


def tb_scalars(log_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, datasets):
    from learner.sft import main

    run_dir = tmp_path_factory.mktemp("sft_run")
    assert main(sft_args(run_dir, datasets, SFT_STEPS, eval_episodes=1)) == 0
    return run_dir


def test_policy_dir_loads_with_the_datasets_statistics(sft_run, datasets):
    from learner.real_replay import RealReplay

    policy = load_policy(str(sft_run / "policy"))
    pooled = RealReplay(datasets=datasets).dataset_stats()
    alone = RealReplay(datasets=datasets[:1]).dataset_stats()
    for key, name in (("action", "action"), ("observation.state", "state")):
        for field in ("mean", "std"):
            got = getattr(policy.normalizer, f"{name}_{field}").numpy()
            np.testing.assert_allclose(got, pooled[key][field], rtol=1e-5, atol=1e-6)
            assert not np.allclose(got, alone[key][field], rtol=1e-5, atol=1e-6), "stats of one dataset only"
    assert policy.normalizer.has_stats.tolist() == [1.0, 1.0]
    # the deployable policy is the trained one: it matches the resumable state's copy, not a fresh init
    state_policy = load_policy(str(sft_run / "sft_state" / "policy"))
    fresh = make_policy(load_config("sft", ["policy=tiny"]).policy)
    for (k, v), v_state, v_fresh in zip(policy.state_dict().items(), state_policy.state_dict().values(),
                                        fresh.state_dict().values()):
        assert torch.equal(v, v_state), k
    assert any(not torch.equal(v, f) for v, f in zip(policy.state_dict().values(), fresh.state_dict().values())
               if v.is_floating_point() and v.numel() > 1)


def test_loss_decreases_and_is_logged(sft_run):
    losses = tb_scalars(sft_run / "tb", "sft/loss")
    assert [s for s, _ in losses] == list(range(LOG_INTERVAL, SFT_STEPS + 1, LOG_INTERVAL))
    first, last = losses[0][1], losses[-1][1]
    assert last < 0.85 * first, f"SFT loss did not go down: {[round(v, 3) for _, v in losses]}"
    summary = json.loads((sft_run / "sft_summary.json").read_text())
    assert summary["steps"] == SFT_STEPS and summary["finished"]
    assert summary["initial_loss"] == pytest.approx(first, rel=1e-5)
    assert summary["final_loss"] == pytest.approx(last, rel=1e-5)
    assert len(tb_scalars(sft_run / "tb", "sft/lr")) == len(losses)


def test_final_evaluation_on_twin_and_real_proxy(sft_run):
    summary = json.loads((sft_run / "sft_summary.json").read_text())
    evals = {e["env"]: e for e in summary["eval_history"]}
    assert set(evals) == {"sim", "real_proxy"} and len(summary["eval_history"]) == 2
    assert summary["eval"] == {env: e["success"] for env, e in evals.items()}
    for e in evals.values():
        assert e["episodes"] == 1 and e["update"] == SFT_STEPS
        assert 0.0 <= e["success"] <= 1.0 and 1 <= e["mean_length"] <= EPISODE_STEPS
    for env in ("sim", "real_proxy"):
        assert [s for s, _ in tb_scalars(sft_run / "tb", f"eval/{env}_success")] == [SFT_STEPS]


def test_rerun_resumes_the_step_count(sft_run, datasets):
    from learner.sft import main

    assert main(sft_args(sft_run, datasets, RESUMED_STEPS, eval_episodes=0)) == 0
    summary = json.loads((sft_run / "sft_summary.json").read_text())
    assert summary["resumed_from"] == SFT_STEPS and summary["steps"] == RESUMED_STEPS
    assert json.loads((sft_run / "sft_state" / "state.json").read_text())["step"] == RESUMED_STEPS
    # AdamW's per-parameter step counter continued from the saved optimiser state
    opt = torch.load(sft_run / "sft_state" / "optimizer.pt", weights_only=True)
    assert {int(s["step"]) for s in opt["state"].values()} == {RESUMED_STEPS}
    assert tb_scalars(sft_run / "tb", "sft/loss")[-1][0] == RESUMED_STEPS
    assert summary["eval_history"][0]["update"] == SFT_STEPS  # history carried over the resume


def test_init_policy_fine_tunes_a_saved_policy_with_its_own_normaliser(sft_run, datasets, tmp_path):
    """sft.init_policy: the run starts from the saved weights and keeps their statistics, not those
    of the datasets it now trains on."""
    from learner.sft import main

    init = load_policy(str(sft_run / "policy"))
    args = sft_args(tmp_path, datasets[1:], 1, eval_episodes=0) + [f"sft.init_policy={sft_run / 'policy'}",
                                                                  "sft.lr=1e-7"]
    assert main(args) == 0
    tuned = load_policy(str(tmp_path / "policy"))
    np.testing.assert_array_equal(tuned.normalizer.action_mean.numpy(), init.normalizer.action_mean.numpy())
    fresh = make_policy(load_config("sft", ["policy=tiny"]).policy)
    weights = [(k, v, init.state_dict()[k], fresh.state_dict()[k]) for k, v in tuned.state_dict().items()
               if v.is_floating_point() and v.numel() > 1 and "normalizer" not in k]
    for k, v, v_init, v_fresh in weights:
        assert (v - v_init).abs().max() < 1e-3, k  # one step at lr 1e-7 from the saved weights
    assert any(not torch.allclose(v, v_fresh) for _, v, _, v_fresh in weights)


# ----- evaluate_policy against a scripted stand-in env ----------------------------------------------
class ScriptedEnv:
    """Succeeds after ``success_after[seed]`` steps (None: never), truncates at ``max_steps``."""

    def __init__(self, success_after: dict, max_steps: int):
        self.success_after, self.max_steps = success_after, max_steps
        self.seeds, self.actions, self.closed = [], [], False

    def reset(self, seed):
        self.seeds.append(seed)
        self.t = 0
        return self.obs(), {"instruction": "put the red cube into the bowl", "success": False}

    def obs(self):
        return {"image": np.zeros((IMG, IMG, 3), np.uint8), "state": np.zeros(8, np.float32)}

    def step(self, action):
        self.actions.append(np.array(action))
        self.t += 1
        success = self.success_after[self.seeds[-1]] == self.t
        return self.obs(), float(success), success, self.t >= self.max_steps and not success, {"success": success}

    def close(self):
        self.closed = True


def test_evaluate_policy_executes_exec_horizon_actions_per_chunk():
    policy = make_policy(load_config("config", ["policy=tiny"]).policy)
    policy.train()
    k, max_steps = policy.exec_horizon, 10
    env = ScriptedEnv({5: 3, 6: None, 7: k + 1}, max_steps)
    calls = []
    act = policy.act
    policy.act = lambda obs: calls.append(obs) or act(obs)

    result = evaluate_policy(policy, None, real_proxy=False, episodes=3, seed=5, env=env)

    assert env.seeds == [5, 6, 7]
    assert result["episodes"] == 3 and result["successes"] == [True, False, True]
    assert result["success_rate"] == pytest.approx(2 / 3)
    assert result["lengths"] == [3, max_steps, k + 1]
    assert result["mean_length"] == pytest.approx((3 + max_steps + k + 1) / 3)
    assert len(calls) == sum(math.ceil(n / k) for n in result["lengths"])  # one chunk per k steps
    assert calls[0]["image"].shape == (1, IMG, IMG, 3) and calls[0]["tokens"].dtype == torch.int64
    assert policy.training and not env.closed  # mode restored; a passed-in env stays open
    policy.eval()
    chunk = act(calls[0])[0].numpy()  # every observation is the same, so every chunk is this one
    np.testing.assert_allclose(np.stack(env.actions[:3]), chunk[:3], rtol=1e-6)  # first chunk, in order
    second_episode = env.actions[3:3 + max_steps]
    np.testing.assert_allclose(np.stack(second_episode[:k]), chunk[:k], rtol=1e-6)
    np.testing.assert_allclose(second_episode[k], chunk[0], rtol=1e-6)  # re-planned after k steps ...
    assert not np.allclose(second_episode[k], chunk[k])  # ... rather than running on into the chunk


def test_policy_agent_replans_every_exec_horizon_steps_and_samples_with_its_generator():
    """common.evaluation.PolicyAgent (demos of a policy): deterministic agents follow policy.act chunk by
    chunk; stochastic ones draw policy.sample's noise from their generator (same seed, same actions)."""
    from common.evaluation import PolicyAgent

    policy = make_policy(load_config("config", ["policy=tiny"]).policy)
    k = policy.exec_horizon
    env = ScriptedEnv({0: None}, 3 * k)
    obs, _ = env.reset(0)
    env.instruction = "put the red cube into the bowl"
    calls = []
    act = policy.act
    policy.act = lambda o, **kw: calls.append(o) or act(o, **kw)
    agent = PolicyAgent(policy, env)
    agent.reset()
    actions = np.stack([agent.act(obs) for _ in range(2 * k + 1)])
    assert len(calls) == 3  # a new chunk at steps 0, k and 2k
    chunk = act(calls[0])[0].numpy()
    np.testing.assert_allclose(actions[:k], chunk[:k], rtol=1e-6)
    np.testing.assert_allclose(actions[k], chunk[0], rtol=1e-6)

    def rollout(seed, sampling="sde"):
        agent = PolicyAgent(policy, env, torch.Generator().manual_seed(seed), sampling)
        agent.reset()
        return np.stack([agent.act(obs) for _ in range(k)])

    for sampling in ("sde", "ode"):
        np.testing.assert_array_equal(rollout(1, sampling), rollout(1, sampling))
        assert not np.allclose(rollout(1, sampling), rollout(2, sampling))
        assert not np.allclose(rollout(1, sampling), chunk[:k])
    # "ode" is the ODE from x_0 = the generator's first draw: policy.act with that generator
    expected = act(calls[0], generator=torch.Generator().manual_seed(1))[0, :k].numpy()
    np.testing.assert_allclose(rollout(1, "ode"), expected, rtol=1e-6)
    assert not np.allclose(rollout(1, "ode"), rollout(1, "sde"))
    with pytest.raises(ValueError, match="sampling='noisy'"):
        PolicyAgent(policy, env, None, "noisy")
