"""The Stage I recipe's parts (issue #16): keypoint encoder, augmentation, auxiliary localisation
loss, sim labels in demos, replay splits and parts, EMA + validation in tandem-sft, diagnostics,
parallel evaluation."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from common.config import load_config
from common.policy import load_policy, make_policy
from common.policy.vision import SpatialSoftmax, random_shift

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ManiSkill's CPU path

IMG, EPISODE_STEPS = 32, 12
KEYPOINT = ["policy=keypoint", "policy.image_size=32", "policy.vision.channels=[8,8]", "policy.vision.strides=[2,1]",
            "policy.vision.keypoints=4", "policy.vision.groups=4", "policy.width=32", "policy.expert.width=32",
            "policy.expert.depth=1", "policy.value_hidden=16"]


def keypoint_policy(stats=None, *extra):
    torch.manual_seed(0)
    return make_policy(load_config("config", [*KEYPOINT, *extra]).policy, stats=stats)


def obs_batch(policy, B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randint(0, 256, (B, IMG, IMG, 3), generator=g, dtype=torch.uint8),
            "tokens": policy.tokenize(["put the red cube into the bowl"] * B),
            "state": torch.randn(B, 8, generator=g)}


# ----- encoder and augmentation ----------------------------------------------------------------
def test_random_shift_is_an_integer_crop_of_the_padded_image():
    S, pad = 8, 2
    x = torch.arange(4 * 3 * S * S, dtype=torch.float32).reshape(4, 3, S, S)
    out = random_shift(x, pad, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    offsets = []
    for i in range(4):
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + S, dx:dx + S])]
        assert match, f"image {i} is not a crop of its padded copy"
        offsets.append(match[0])
    assert len(set(offsets)) > 1  # not the same shift for every image
    assert torch.equal(random_shift(x, 0), x)


def test_spatial_softmax_returns_the_hot_cell_as_x_then_y():
    ss = SpatialSoftmax(channels=1, keypoints=1)
    with torch.no_grad():
        ss.to_heatmaps.weight.fill_(1.0)
        ss.to_heatmaps.bias.zero_()
    features = torch.zeros(1, 1, 5, 9)
    features[0, 0, 1, 7] = 100.0  # row 1 of 5, column 7 of 9
    xy = ss(features)[0, 0]
    assert xy[0].item() == pytest.approx(-1 + 2 * 7 / 8, abs=1e-3)
    assert xy[1].item() == pytest.approx(-1 + 2 * 1 / 4, abs=1e-3)


def test_keypoint_policy_keeps_the_rl_contract_and_augments_only_sft_in_training():
    policy = keypoint_policy()
    obs = obs_batch(policy)
    out = policy.sample(obs, generator=torch.Generator().manual_seed(1))
    ev = policy.evaluate(obs, out.chain)
    torch.testing.assert_close(out.log_prob, ev.log_prob, atol=1e-4, rtol=0)
    demo = torch.randn(6, policy.chunk_size, 7) * 0.01
    errs = lambda: policy.sft_errors(obs, demo, generator=torch.Generator().manual_seed(3))  # noqa: E731
    policy.eval()
    plain = errs()
    policy.train()
    augmented = errs()
    assert torch.equal(augmented, errs())  # the augmentation draws from the given generator too
    assert not torch.equal(plain, augmented)  # training mode shifts and jitters the images
    ev_train = policy.evaluate(obs, out.chain)  # RL re-evaluation is never augmented
    torch.testing.assert_close(ev_train.log_prob, ev.log_prob, atol=1e-4, rtol=0)


def test_aux_loss_uses_only_labelled_rows_standardised_by_the_stats():
    stats = {"observation.environment_state": {"mean": np.arange(6.0), "std": np.array([2.0, 2, 2, 2, 2, 1e-5])}}
    policy = keypoint_policy(stats)
    assert policy.aux_std[-1].item() == pytest.approx(0.01)  # floored at aux.min_std
    obs = obs_batch(policy)
    emb = policy.encode(obs)
    labels = torch.randn(6, 6)
    labels[::2] = float("nan")  # rows 0, 2, 4: frames without simulator labels (real data)
    target = (labels[1::2] - policy.aux_mean) / policy.aux_std
    want = (policy.aux_head(emb[1::2]) - target).pow(2).mean()
    torch.testing.assert_close(policy.aux_loss(emb, labels), want)
    none = policy.aux_loss(emb, torch.full((6, 6), float("nan")))
    assert none.item() == 0.0
    demo = torch.randn(6, policy.chunk_size, 7) * 0.01
    without = policy.sft_loss(obs, demo, generator=torch.Generator().manual_seed(0))
    policy.eval()
    with_labels = policy.sft_loss({**obs, "privileged": labels}, demo, generator=torch.Generator().manual_seed(0))
    aux = policy.last_sft_terms["aux"].item()
    flat = policy.sft_loss(obs, demo, generator=torch.Generator().manual_seed(0))
    assert "aux" not in policy.last_sft_terms
    assert aux > 0 and with_labels.item() == pytest.approx(flat.item() + policy.aux_weight * aux, rel=1e-5)
    assert torch.isfinite(without)


def test_aux_buffers_travel_with_save_and_load(tmp_path):
    stats = {"observation.environment_state": {"mean": np.arange(6.0), "std": np.full(6, 0.5)}}
    policy = keypoint_policy(stats)
    policy.save(str(tmp_path / "p"))
    loaded = load_policy(str(tmp_path / "p"))
    torch.testing.assert_close(loaded.aux_mean, policy.aux_mean)
    torch.testing.assert_close(loaded.aux_std, policy.aux_std)


# ----- data: sim labels, parts, splits ------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """Three twin episodes (with sim labels) written by two demo workers, and one real-proxy episode."""
    from common.twin import write_demos
    from common.twin.demos import main as demos_main

    base = tmp_path_factory.mktemp("stage1_data")
    overrides = [f"env.image_size={IMG}", f"env.max_episode_steps={EPISODE_STEPS}"]
    assert demos_main([f"out={base / 'twin'}", "episodes=3", "workers=2", "seed_stride=100", "keep_failed=true",
                       *overrides]) == 0
    env_cfg = load_config("config", ["env=real_proxy", *overrides]).env
    write_demos(env_cfg, base / "real", "local/real", 1, real_proxy=True, seed=7, keep_failed=True, progress=False)
    return base


def test_demo_workers_write_parts_with_sim_labels_that_match_the_simulator(demo_data):
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    from common.twin import make_env
    from common.dataset_schema import PRIVILEGED_KEY

    parts = sorted(p.name for p in (demo_data / "twin").iterdir())
    assert parts == ["part_00", "part_01"]
    ds = LeRobotDataset("local/p1", root=demo_data / "twin" / "part_01")
    assert PRIVILEGED_KEY in ds.features
    env = make_env(load_config("config", [f"env.image_size={IMG}"]).env, obs_mode="state")
    _, info = env.reset(seed=100)  # worker 1's first seed
    env.close()
    np.testing.assert_allclose(ds[0][PRIVILEGED_KEY].numpy(), info["privileged"], atol=1e-6)
    real = LeRobotDataset("local/real", root=demo_data / "real")
    assert PRIVILEGED_KEY not in real.features  # the real proxy stands in for real episodes: no labels


def test_replay_merges_parts_caps_episodes_holds_out_and_marks_unlabelled_rows(demo_data):
    from learner.real_replay import RealReplay

    twin = {"repo_id": "local/twin", "root": str(demo_data / "twin")}
    replay = RealReplay([twin, {"repo_id": "local/real", "root": str(demo_data / "real")}])
    src = replay.sources[0]
    assert src.num_episodes == 3 and src.privileged.shape == (src.num_frames, 6)
    assert len(np.unique(src.episode_end)) == 3 and src.episode_end.max() == src.num_frames
    assert replay.sources[1].privileged is None
    assert "observation.environment_state" in replay.dataset_stats()
    batch = replay.sample(64, 4, np.random.default_rng(0))
    from_real = np.array([s == "local/real" for s in batch["source"]])
    assert from_real.any() and (~from_real).any()
    assert np.isnan(batch["privileged"][from_real]).all() and np.isfinite(batch["privileged"][~from_real]).all()

    capped = RealReplay([{**twin, "max_episodes": 2}]).sources[0]
    assert capped.num_episodes == 2 and capped.num_frames == int(np.unique(src.episode_end)[1])

    full = RealReplay([twin])
    val = full.hold_out(0.34)  # floor(0.34 * 3) = 1 episode
    assert full.sources[0].num_episodes == 2 and val.sources[0].num_episodes == 1
    assert full.sources[0].num_frames + val.sources[0].num_frames == src.num_frames
    np.testing.assert_array_equal(val.sources[0].action, src.action[full.sources[0].num_frames:])
    assert val.sources[0].episode_end.max() == val.sources[0].num_frames
    assert RealReplay([twin]).hold_out(0.2).sources == []  # floor(0.6) = 0: nothing spared


def test_sft_with_ema_validation_and_aux_logs_and_saves_the_ema_weights(demo_data, tmp_path):
    from learner.sft import main

    run = tmp_path / "run"
    items = (f"[{{repo_id: local/twin, root: '{demo_data / 'twin'}', weight: 1.0}}, "
             f"{{repo_id: local/real, root: '{demo_data / 'real'}', weight: 0.5}}]")
    assert main([f"run_dir={run}", *KEYPOINT, "device=cpu", "sft.torch_threads=1", f"env.image_size={IMG}",
                 f"sft.datasets={items}", "sft.steps=20", "sft.batch_size=8", "sft.log_interval=5",
                 "sft.eval_episodes=0", "sft.ema_decay=0.9", "sft.val_fraction=0.34", "sft.diag_interval=10",
                 "sft.diag_frames=16", "sft.checkpoint_interval=10", f"sft.snapshot_dir={run / 'snaps'}"]) == 0
    summary = json.loads((run / "sft_summary.json").read_text())
    assert summary["data"]["episodes"] == 3  # 2 twin + 1 real for training, 1 twin held out
    diag = summary["diagnostics"]
    assert diag["step"] == 20 and np.isfinite(diag["val_loss"]) and set(diag["val"]["mae_over_std"]) >= {"dx", "gripper"}
    assert set(summary["final_loss_terms"]) == {"sft/flow_loss", "sft/aux_loss"}
    assert sorted(p.name for p in (run / "snaps").iterdir()) == ["step_000010", "step_000020"]
    deployed = load_policy(str(run / "policy")).state_dict()
    ema = load_policy(str(run / "sft_state" / "ema")).state_dict()
    raw = load_policy(str(run / "sft_state" / "policy")).state_dict()
    assert all(torch.equal(deployed[k], ema[k]) for k in deployed)
    assert any(not torch.equal(deployed[k], raw[k]) for k in deployed if deployed[k].is_floating_point())


# ----- diagnostics and evaluation ------------------------------------------------------------------
class ZeroPolicy:
    """Stands in for a policy whose deterministic chunk is all zeros."""
    chunk_size, exec_horizon, training = 4, 2, False
    device = torch.device("cpu")

    def __init__(self, std):
        self.normalizer = type("N", (), {"action_std": torch.as_tensor(std, dtype=torch.float32)})()

    def tokenize(self, texts):
        return torch.zeros(len(texts), 2, dtype=torch.long)

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def act(self, obs):
        return torch.zeros(obs["image"].shape[0], self.chunk_size, 7)


def test_action_errors_are_mean_absolute_error_over_std_on_executed_steps(demo_data):
    from learner.diagnose import action_errors
    from learner.real_replay import RealReplay

    replay = RealReplay([{"repo_id": "local/real", "root": str(demo_data / "real")}])
    std = np.linspace(0.01, 0.07, 7)
    report = action_errors(ZeroPolicy(std), replay, frames=40, seed=3, batch_size=16)
    rng = np.random.default_rng(3)
    abs_sum, n = np.zeros(7), 0.0
    for size in (16, 16, 8):  # the same draws as action_errors makes
        b = replay.sample(size, 4, rng)
        keep = ~b["action_pad"][:, :2]
        abs_sum += (np.abs(b["actions"][:, :2]) * keep[..., None]).sum((0, 1))
        n += keep.sum()
    np.testing.assert_allclose(list(report["mae_over_std"].values()), abs_sum / n / (std + 1e-8), rtol=1e-5)
    assert report["gripper_sign_error"] == pytest.approx(1.0)  # sign(0) never equals a +-1 command


def test_evaluation_summary_interval_and_seeds():
    from common.evaluation import parse_seeds, shape_of, summarize, wilson_interval

    assert parse_seeds(["10:13", "7"]) == [10, 11, 12, 7]
    assert shape_of("put the red ball into the bowl", {"cube": "cube", "sphere": "ball"}) == "sphere"
    lo, hi = wilson_interval(40, 100)
    assert lo < 0.4 < hi and hi - lo == pytest.approx(0.19, abs=0.01)
    eps = [{"env": "twin", "success": s, "length": 10, "return": float(s), "held_at_end": h, "shape": sh}
           for s, h, sh in [(True, False, "cube"), (False, True, "cube"), (True, False, "sphere"), (True, False, "sphere")]]
    s = summarize(eps)["twin"]
    assert s["success"] == 0.75 and s["per_shape"]["cube"] == {"success": 0.5, "episodes": 2}
    assert s["held_at_end"] == 0.25


def test_an_episode_calls_back_after_every_chunk_and_reports_the_grasp_at_its_end():
    from common.evaluation import run_episode
    from common.twin import make_env

    policy = make_policy(load_config("config", ["policy=tiny"]).policy).eval()
    env = make_env(load_config("config", [f"env.image_size={IMG}", "env.max_episode_steps=7"]).env, obs_mode="rgb")
    calls = []
    try:
        with torch.no_grad():
            result = run_episode(policy, env, 3, "cpu", on_chunk=lambda: calls.append(env.unwrapped._elapsed))
    finally:
        env.close()
    k = policy.exec_horizon
    assert result.length == 7 and not result.success
    assert calls == [min(k * (i + 1), 7) for i in range(-(-7 // k))]  # one call per chunk, the last one cut short
    assert isinstance(result.held_at_end, bool)


def test_parallel_evaluation_applies_the_policys_env_overrides(tmp_path):
    from common.evaluation import evaluate_parallel

    policy = make_policy(load_config("config", ["policy=tiny"]).policy)
    d = tmp_path / "policy"
    policy.save(str(d))
    (d / "env_overrides.json").write_text(json.dumps([f"env.image_size={IMG}", "env.max_episode_steps=6"]))
    result = evaluate_parallel([(str(d), ["twin", "real_proxy"], [100, 101])], workers=2, progress=False)[str(d)]
    assert [(e["env"], e["seed"]) for e in result["episodes"]] == [("real_proxy", 100), ("real_proxy", 101),
                                                                    ("twin", 100), ("twin", 101)]
    assert all(e["length"] <= 6 for e in result["episodes"])  # the stored override was applied
    assert all(isinstance(e["held_at_end"], bool) for e in result["episodes"])
    assert result["summary"]["twin"]["episodes"] == 2
    (d / "env_overrides.json").write_text(json.dumps({"env.image_size": 32}))
    with pytest.raises(ValueError, match="JSON list"):
        evaluate_parallel([(str(d), ["twin"], [1])], workers=1, progress=False)


def test_the_shipped_stage1_checkpoint_loads_and_acts_at_its_render_size():
    from common.config import CONFIG_DIR
    from common.evaluation import policy_env_overrides

    ckpt = CONFIG_DIR.parent / "checkpoints" / "stage1"
    overrides = policy_env_overrides(str(ckpt))
    assert overrides == ["env.image_size=128"]
    policy = load_policy(str(ckpt)).eval()
    assert policy.cfg["vision"]["type"] == "cnn_keypoints" and policy.num_parameters() < 3_000_000
    assert policy.normalizer.has_stats.all()  # the demos' action/state statistics travel with it
    obs = {"image": torch.zeros(2, 128, 128, 3, dtype=torch.uint8), "tokens": policy.tokenize(["put the red cube into the bowl"] * 2),
           "state": torch.tensor([[0.6, 0.0, 0.2, 0.0, 1.0, 0.0, 0.0, 0.08]] * 2)}
    chunk = policy.act(obs)
    assert chunk.shape == (2, policy.chunk_size, 7) and torch.isfinite(chunk).all()
    assert (chunk[..., :3].abs() <= 0.031 * 4).all()  # translations stay within a few action bounds
