"""Real replay: LeRobot round trip, action chunks with padding, mixing, live episodes persisted."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from learner.real_replay import RealReplay

HW = (16, 16)
EPISODE_LENGTHS = (5, 7)
TASKS = ("put the cube in the bowl", "put the can in the bowl")
KEY_MAP = {"observation.images.front": "observation.image"}  # state and action keep their names


def frame_value(source: int, episode: int, frame: int) -> float:
    return 1000 * source + 100 * episode + frame


def write_dataset(root, source=0, lengths=EPISODE_LENGTHS):
    """A LeRobot v3.0 dataset whose every value encodes (source, episode, frame)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    features = {
        "observation.images.front": {"dtype": "image", "shape": (*HW, 3), "names": ["height", "width", "channel"]},
        "observation.state": {"dtype": "float32", "shape": (8,), "names": None},
        "action": {"dtype": "float32", "shape": (7,), "names": None},
    }
    ds = LeRobotDataset.create(f"test/real{source}", fps=10, features=features, root=root, use_videos=False)
    for ep, n in enumerate(lengths):
        for i in range(n):
            v = frame_value(source, ep, i)
            ds.add_frame({"observation.images.front": np.full((*HW, 3), (10 * ep + i) % 256, np.uint8),
                          "observation.state": np.full(8, v, np.float32),
                          "action": np.full(7, v, np.float32), "task": TASKS[ep % 2]})
        ds.save_episode()
    ds.finalize()


def live_episode(episode: int, n: int):
    v = np.array([frame_value(9, episode, i) for i in range(n)], np.float32)
    return {"observation.image": np.repeat(((50 + 10 * episode + np.arange(n)) % 256).astype(np.uint8), HW[0] * HW[1] * 3).reshape(n, *HW, 3),
            "observation.state": np.repeat(v[:, None], 8, 1), "action": np.repeat(v[:, None], 7, 1)}


def check_chunks(batch, lengths_by_source, chunk):
    """Every sampled row: state encodes (source, episode, frame); the chunk is the next actions,
    the last one repeated past the episode end and marked as padding."""
    for row in range(len(batch["task"])):
        v = int(round(batch["state"][row, 0]))
        source, episode, frame = v // 1000, (v % 1000) // 100, v % 100
        n = lengths_by_source[source][episode]
        steps = frame + np.arange(chunk)
        expected = [frame_value(source, episode, min(s, n - 1)) for s in steps]
        np.testing.assert_array_equal(batch["actions"][row, :, 0], expected)
        np.testing.assert_array_equal(batch["action_pad"][row], steps >= n)
        assert (batch["actions"][row] == batch["actions"][row, :, :1]).all()
    assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (*HW, 3)


def test_round_trip_from_a_lerobot_dataset(tmp_path):
    write_dataset(tmp_path / "real0")
    replay = RealReplay([{"repo_id": "test/real0", "root": str(tmp_path / "real0"), "weight": 1.0, "key_map": KEY_MAP}])
    assert replay.size()["frames"] == 12 and replay.size()["episodes"] == 2

    batch = replay.sample(64, chunk_size=4, generator=np.random.default_rng(0))
    assert batch["state"].shape == (64, 8) and batch["actions"].shape == (64, 4, 7) and batch["action_pad"].shape == (64, 4)
    check_chunks(batch, {0: EPISODE_LENGTHS}, chunk=4)
    assert batch["action_pad"].any() and not batch["action_pad"].all()
    for row in range(64):
        v = int(round(batch["state"][row, 0]))
        episode, frame = v // 100, v % 100
        assert batch["task"][row] == TASKS[episode % 2]
        assert (batch["image"][row] == (10 * episode + frame) % 256).all()

    actions = np.array([frame_value(0, ep, i) for ep, n in enumerate(EPISODE_LENGTHS) for i in range(n)])
    stats = replay.dataset_stats()
    np.testing.assert_allclose(stats["action"]["mean"], np.full(7, actions.mean()))
    np.testing.assert_allclose(stats["action"]["std"], np.full(7, actions.std()))
    np.testing.assert_allclose(stats["observation.state"]["max"], np.full(8, actions.max()))


def test_dataset_mapping_errors_name_the_dataset_the_key_and_the_fix(tmp_path):
    """Issue #18, item 6: every mistake a key_map or dataset entry can hold is a clear error."""
    write_dataset(tmp_path / "real0", lengths=(2,))
    root = str(tmp_path / "real0")
    good_map = {"observation.images.front": "observation.image"}

    def error(entries, **kw):
        with pytest.raises(ValueError) as e:
            RealReplay(entries, **kw)
        return str(e.value)

    msg = error([{"repo_id": "test/real0", "root": root}])  # the image column is not mapped
    assert "test/real0" in msg and "observation.image" in msg and "key_map" in msg
    msg = error([{"repo_id": "test/real0", "root": root, "key_map": {"observation.images.front": "observation.img"}}])
    assert "'observation.img'" in msg and "not one of Tandem's keys" in msg  # a wrong target is no longer ignored
    msg = error([{"repo_id": "test/real0", "root": root, "key_map": {**good_map, "observation.images.side": "action"}}])
    assert "'observation.images.side'" in msg and "does not have" in msg
    msg = error([{"repo_id": "test/real0", "root": root, "key_map": {**good_map, "observation.state": "action"}}])
    assert "observation.state" in msg and "several Tandem keys" in msg  # one column for two keys
    assert "needs `repo_id` and `root`" in error([{"repo_id": "test/real0"}])
    both = [{"repo_id": "test/real0", "root": root, "key_map": good_map}] * 2
    assert "more than once" in error(both)
    assert "recorded at 10 fps" in error([{"repo_id": "test/real0", "root": root, "key_map": good_map}], fps=20)
    ok = RealReplay([{"repo_id": "test/real0", "root": root, "key_map": good_map, "fps": 10},  # declared: accepted
                     {"repo_id": "test/real0", "name": "again", "root": root, "key_map": good_map, "fps": 10}], fps=20)
    assert ok.size()["frames"] == 2 * ok.size()["sources"]["test/real0"]["frames"]
    with pytest.raises(FileNotFoundError):
        RealReplay([{"repo_id": "test/none", "root": str(tmp_path / "nothing")}])


def test_live_episodes_persist_and_reload(tmp_path):
    write_dataset(tmp_path / "real0")
    datasets = [{"repo_id": "test/real0", "root": str(tmp_path / "real0"), "weight": 1.0, "key_map": KEY_MAP}]
    live = {"repo_id": "test/live", "root": str(tmp_path / "live"), "weight": 3.0, "fps": 10}
    replay = RealReplay(datasets, live)
    assert replay.size()["sources"]["live"] == {"frames": 0, "episodes": 0}
    replay.add_episode(live_episode(0, 4), "live task a")
    replay.add_episode(live_episode(1, 6), "live task b")
    assert replay.size()["sources"]["live"] == {"frames": 10, "episodes": 2}
    lengths = {0: EPISODE_LENGTHS, 9: (4, 6)}
    batch = replay.sample(2000, chunk_size=3, generator=np.random.default_rng(1))
    check_chunks(batch, lengths, chunk=3)
    live_share = np.mean([s == "live" for s in batch["source"]])
    assert 0.72 < live_share < 0.78  # weights 1 : 3
    assert {t for t, s in zip(batch["task"], batch["source"]) if s == "live"} == {"live task a", "live task b"}

    # a restarted learner re-opens the live dataset, keeps its episodes and appends after them
    del replay
    reopened = RealReplay(datasets, live)
    assert reopened.size()["sources"]["live"] == {"frames": 10, "episodes": 2}
    reopened.add_episode(live_episode(2, 3), "live task a")
    again = RealReplay(datasets, live)
    assert again.size()["sources"]["live"] == {"frames": 13, "episodes": 3}
    lengths[9] = (4, 6, 3)
    only_live = RealReplay([], live)
    batch = only_live.sample(300, chunk_size=5, generator=np.random.default_rng(2))
    check_chunks(batch, lengths, chunk=5)
    for row in range(300):
        v = int(round(batch["state"][row, 0])) % 1000
        assert (batch["image"][row] == (50 + 10 * (v // 100) + v % 100) % 256).all()
        assert batch["task"][row] == ("live task b" if v // 100 == 1 else "live task a")


def test_live_episode_with_other_shapes_is_rejected(tmp_path):
    write_dataset(tmp_path / "real0", lengths=(3,))
    replay = RealReplay([{"repo_id": "test/real0", "root": str(tmp_path / "real0"), "key_map": KEY_MAP}],
                        {"repo_id": "test/live", "root": str(tmp_path / "live"), "fps": 10})
    episode = live_episode(0, 2)
    episode["observation.image"] = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="differ"):
        replay.add_episode(episode, "task")
    assert not (tmp_path / "live").exists() or replay.size()["sources"]["live"]["episodes"] == 0


def test_from_learner_config(tmp_path):
    from omegaconf import OmegaConf
    write_dataset(tmp_path / "real0", lengths=(3, 2))
    cfg = OmegaConf.create({
        "real_datasets": [{"repo_id": "test/real0", "root": str(tmp_path / "real0"), "weight": 1.0, "key_map": KEY_MAP}],
        "live_dataset": {"repo_id": "test/live", "root": None, "weight": 1.0, "fps": 10}})
    replay = RealReplay.from_config(cfg)
    assert replay.live is None and replay.size()["episodes"] == 2
    with pytest.raises(RuntimeError):
        replay.add_episode(live_episode(0, 2), "task")


def test_video_dataset_is_decoded_into_memory(tmp_path):
    """Real LeRobot datasets usually store camera frames as video: decoded once at load."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    features = {"cam": {"dtype": "video", "shape": (64, 64, 3), "names": ["height", "width", "channel"]},
                "observation.state": {"dtype": "float32", "shape": (8,), "names": None},
                "action": {"dtype": "float32", "shape": (7,), "names": None}}
    ds = LeRobotDataset.create("test/video", fps=10, features=features, root=tmp_path / "video", use_videos=True)
    for ep, n in enumerate((4, 3)):
        for i in range(n):
            ds.add_frame({"cam": np.full((64, 64, 3), 60 * i, np.uint8), "observation.state": np.full(8, 100 * ep + i, np.float32),
                          "action": np.full(7, 100 * ep + i, np.float32), "task": TASKS[ep]})
        ds.save_episode()
    ds.finalize()
    replay = RealReplay([{"repo_id": "test/video", "root": str(tmp_path / "video"), "key_map": {"cam": "observation.image"}}])
    src = replay.sources[0]
    assert src.image.shape == (7, 64, 64, 3) and src.image.dtype == np.uint8
    frame = np.array([0, 1, 2, 3, 0, 1, 2])
    assert np.abs(src.image[:, 32, 32, 0].astype(int) - 60 * frame).max() <= 8  # lossy codec
    np.testing.assert_array_equal(src.action[:, 0], [0, 1, 2, 3, 100, 101, 102])
