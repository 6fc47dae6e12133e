"""Replay of real demonstrations for the SFT loss: LeRobot datasets on disk plus live episodes.

Sources:
  * any number of LeRobot (v3.0) datasets, each with a mixing ``weight`` and a ``key_map`` from
    the dataset's feature names to ours (e.g. "observation.images.front" -> "observation.image");
  * the live source: episodes the collector streams in (``add_episode``). Each one is appended to
    a LeRobot dataset on the learner's disk and closed (``finalize``) before ``add_episode``
    returns, so a restart keeps it; on start an existing live dataset is re-opened and loaded.

Our keys: "observation.image" uint8 [H, W, 3], "observation.state" float32 [S],
"action" float32 [7], and a task string per frame. All sources must share image size and state
dimension (images are returned as stored; the policy resizes).

Everything is held in memory as numpy arrays (decoded images included): sampling is pure
indexing, with no decoding on the training path. That suits the small real datasets this
system co-trains on (tens to a few hundred episodes); larger ones would want a lazy reader.
Appending a live episode re-opens the LeRobot dataset (its "resume recording" path), writes one
new parquet file and re-concatenates the in-memory arrays: O(dataset) per episode, fine at this
scale. ``add_episode`` and ``sample`` are thread-safe, so the write can run off the train loop.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

IMAGE, STATE, ACTION = "observation.image", "observation.state", "action"
OUR_KEYS = (IMAGE, STATE, ACTION)
# optional: simulator labels (object and bowl positions) of sim demos, for the policy's auxiliary loss
PRIVILEGED = "observation.environment_state"


@dataclass
class ReplaySource:
    name: str
    weight: float
    image: np.ndarray  # uint8 [N, H, W, 3]
    state: np.ndarray  # float32 [N, S]
    action: np.ndarray  # float32 [N, A]
    task_index: np.ndarray  # int64 [N]
    episode_end: np.ndarray  # int64 [N]: exclusive end (within this source) of each frame's episode
    tasks: list[str] = field(default_factory=list)
    num_episodes: int = 0
    privileged: Optional[np.ndarray] = None  # float32 [N, P] simulator labels, None for real data

    @property
    def num_frames(self) -> int:
        return len(self.action)

    def append(self, image, state, action, task: str) -> None:
        if task not in self.tasks:
            self.tasks.append(task)
        n, start = len(action), self.num_frames
        if self.privileged is not None:
            self.privileged = np.concatenate([self.privileged, np.full((n, self.privileged.shape[1]), np.nan, np.float32)])
        self.image = np.concatenate([self.image, image])
        self.state = np.concatenate([self.state, state])
        self.action = np.concatenate([self.action, action])
        self.task_index = np.concatenate([self.task_index, np.full(n, self.tasks.index(task), np.int64)])
        self.episode_end = np.concatenate([self.episode_end, np.full(n, start + n, np.int64)])
        self.num_episodes += 1


def split_last_episodes(src: ReplaySource, num_val: int) -> tuple[ReplaySource, ReplaySource]:
    """(train, validation) views of ``src``: its last ``num_val`` episodes held out."""
    ends = np.unique(src.episode_end)
    if num_val <= 0 or len(ends) <= num_val:
        raise ValueError(f"{src.name}: cannot hold out {num_val} of {len(ends)} episodes")
    cut = int(ends[-num_val - 1])

    def part(lo: int, hi: int, name: str, episodes: int) -> ReplaySource:
        return ReplaySource(name, src.weight, src.image[lo:hi], src.state[lo:hi], src.action[lo:hi],
                            src.task_index[lo:hi], src.episode_end[lo:hi] - lo, list(src.tasks), episodes,
                            None if src.privileged is None else src.privileged[lo:hi])

    return part(0, cut, src.name, len(ends) - num_val), part(cut, src.num_frames, f"{src.name}/val", num_val)


def first_episodes(src: ReplaySource, max_episodes: Optional[int]) -> ReplaySource:
    """``src`` cut to its first ``max_episodes`` episodes (None or more than it holds: unchanged)."""
    if max_episodes is None or src.num_episodes <= int(max_episodes):
        return src
    if int(max_episodes) < 1:
        raise ValueError(f"{src.name}: max_episodes must be >= 1, got {max_episodes}")
    return split_last_episodes(src, src.num_episodes - int(max_episodes))[0]


def _empty_source(name: str, weight: float, image_hw=(0, 0), state_dim: int = 0, action_dim: int = 7) -> ReplaySource:
    return ReplaySource(name, weight, np.zeros((0, *image_hw, 3), np.uint8), np.zeros((0, state_dim), np.float32),
                        np.zeros((0, action_dim), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))


def _open_lerobot(repo_id: str, root: str | Path):
    """Open a local LeRobot dataset; never reaches out to the Hub (a missing root is an error)."""
    if not (Path(root) / "meta" / "info.json").exists():
        raise FileNotFoundError(f"no LeRobot dataset at {root}")
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # heavy import, only when needed
    return LeRobotDataset(repo_id, root=root)


def _decode_video_column(ds, key: str, episode_index: np.ndarray, timestamps: np.ndarray) -> np.ndarray:
    from lerobot.datasets.video_utils import decode_video_frames
    frames = []
    for ep in np.unique(episode_index):
        ts = timestamps[episode_index == ep]
        offset = ds.meta.episodes[int(ep)][f"videos/{key}/from_timestamp"]
        video = decode_video_frames(ds.root / ds.meta.get_video_file_path(int(ep), key),
                                    [offset + float(t) for t in ts], ds.tolerance_s, ds.video_backend)
        frames.append((video.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy())  # float CHW -> uint8 HWC
    return np.concatenate(frames)


def dataset_parts(root: str | Path) -> list[Path]:
    """``[root]`` for a LeRobot dataset, or its ``part_*`` datasets for a folder of parts (the
    output of ``common.twin.demos workers=N``)."""
    root = Path(root)
    if (root / "meta" / "info.json").exists():
        return [root]
    parts = sorted(p for p in root.glob("part_*") if (p / "meta" / "info.json").exists())
    if not parts:
        raise FileNotFoundError(f"no LeRobot dataset at {root} (nor part_*/ datasets under it)")
    return parts


def merge_sources(name: str, weight: float, parts: Sequence[ReplaySource]) -> ReplaySource:
    """One source from several (frames concatenated, episode ends and task ids re-based)."""
    if len(parts) == 1:
        return parts[0]
    tasks = sorted({t for p in parts for t in p.tasks})
    offsets = np.cumsum([0] + [p.num_frames for p in parts[:-1]])
    labelled = all(p.privileged is not None for p in parts)
    return ReplaySource(
        name, float(weight), np.concatenate([p.image for p in parts]), np.concatenate([p.state for p in parts]),
        np.concatenate([p.action for p in parts]),
        np.concatenate([np.array([tasks.index(t) for t in p.tasks], np.int64)[p.task_index] for p in parts]),
        np.concatenate([p.episode_end + o for p, o in zip(parts, offsets)]), tasks,
        sum(p.num_episodes for p in parts),
        np.concatenate([p.privileged for p in parts]) if labelled else None)


def check_dataset_entries(datasets: Sequence[Mapping]) -> None:
    """Each entry of ``learner.real_datasets`` / ``sft.datasets`` names a repo_id and a root, and no
    two entries share a name (sizes and mixing are reported per name)."""
    names = []
    for i, d in enumerate(datasets):
        if not isinstance(d, Mapping) or not d.get("repo_id") or not d.get("root"):
            raise ValueError(f"dataset entry {i} ({dict(d) if isinstance(d, Mapping) else d!r}) needs `repo_id` and "
                             "`root` (the dataset's folder on disk), e.g. {repo_id: local/demos, root: data/demos}")
        names.append(d.get("name") or d["repo_id"])
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"datasets {dup} appear more than once: give each entry its own `name` (or repo_id), "
                         "e.g. {repo_id: local/demos, name: demos_b, root: ...}")


def resolve_key_map(name: str, features: Mapping, key_map: Optional[Mapping[str, str]]) -> dict[str, str]:
    """Our key -> the dataset's column. ``key_map`` is {dataset column: our key}; our keys the dataset
    has under their own names need no entry. Errors name the dataset, the key and the fix."""
    key_map = dict(key_map or {})
    for theirs, ours in key_map.items():
        if ours not in OUR_KEYS:
            raise ValueError(f"{name}: key_map maps {theirs!r} to {ours!r}, which is not one of Tandem's keys "
                             f"{list(OUR_KEYS)}; write key_map as {{dataset column: Tandem key}}")
        if theirs not in features:
            raise ValueError(f"{name}: key_map names the column {theirs!r}, which the dataset does not have; "
                             f"its features are {sorted(features)}")
    targets = list(key_map.values())
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:
        raise ValueError(f"{name}: key_map maps several columns to {twice}; keep one column per Tandem key")
    ours_to_theirs = {k: k for k in OUR_KEYS if k in features}
    ours_to_theirs.update({ours: theirs for theirs, ours in key_map.items()})
    missing = [k for k in OUR_KEYS if k not in ours_to_theirs]
    if missing:
        raise ValueError(f"{name}: no column for {missing}; map one in key_map ({{dataset column: Tandem key}}), "
                         f"the dataset's features are {sorted(features)}")
    columns = list(ours_to_theirs.values())
    shared = sorted({c for c in columns if columns.count(c) > 1})
    if shared:
        raise ValueError(f"{name}: the column(s) {shared} would stand for several Tandem keys "
                         f"({ {k: v for k, v in ours_to_theirs.items() if v in shared} }); fix key_map")
    return ours_to_theirs


def load_lerobot_source(name: str, repo_id: str, root: str | Path, weight: float = 1.0,
                        key_map: Optional[Mapping[str, str]] = None, fps: Optional[int] = None) -> ReplaySource:
    """Read a whole LeRobot dataset (or a folder of ``part_*`` datasets) into memory under our keys.
    ``key_map``: dataset key -> our key (our keys present in the dataset under their own name need no entry).
    ``fps``: the rate the data must have been recorded at (None: not checked); action chunks are
    sequences of consecutive frames, so another rate changes what an action chunk means."""
    parts = dataset_parts(root)
    if len(parts) > 1:
        return merge_sources(name, weight, [_load_one(name, repo_id, p, weight, key_map, fps) for p in parts])
    return _load_one(name, repo_id, parts[0], weight, key_map, fps)


def _load_one(name: str, repo_id: str, root: Path, weight: float, key_map: Optional[Mapping[str, str]],
              fps: Optional[int] = None) -> ReplaySource:
    ds = _open_lerobot(repo_id, root)
    ours_to_theirs = resolve_key_map(name, ds.features, key_map)
    if fps is not None and int(ds.fps) != int(fps):
        raise ValueError(f"{name}: recorded at {ds.fps} fps, but this run acts at {fps} Hz (env.control_freq); "
                         f"resample the dataset, or declare `fps: {ds.fps}` on its entry to accept it as it is")

    image_key = ours_to_theirs[IMAGE]
    is_video = ds.features[image_key]["dtype"] == "video"
    columns = ["index", "episode_index", "task_index", "timestamp", ours_to_theirs[STATE], ours_to_theirs[ACTION]]
    has_privileged = PRIVILEGED in ds.features
    if has_privileged:
        columns.append(PRIVILEGED)
    if not is_video:
        columns.append(image_key)
    table = ds.hf_dataset.with_format("numpy").select_columns(columns)[:]
    order = np.argsort(table["index"], kind="stable")
    table = {k: v[order] for k, v in table.items()}
    episode_index = table["episode_index"].astype(np.int64)
    image = (_decode_video_column(ds, image_key, episode_index, table["timestamp"]) if is_video
             else table[image_key])
    if image.ndim != 4 or image.shape[-1] != 3 or image.dtype != np.uint8:  # e.g. stored channel-first
        raise ValueError(f"{name}: expected uint8 HxWx3 images, got {image.dtype} {image.shape}")

    # frames are contiguous per episode: each frame's episode ends where its episode's last frame is
    _, first, counts = np.unique(episode_index, return_index=True, return_counts=True)
    episode_end = np.repeat(first + counts, counts)
    tasks = {int(row.task_index): str(task) for task, row in ds.meta.tasks.iterrows()}
    task_ids = sorted(tasks)
    remap = np.zeros(max(task_ids) + 1, np.int64)
    remap[task_ids] = np.arange(len(task_ids))
    return ReplaySource(name, float(weight), np.ascontiguousarray(image),
                        table[ours_to_theirs[STATE]].astype(np.float32),
                        table[ours_to_theirs[ACTION]].astype(np.float32),
                        remap[table["task_index"].astype(np.int64)], episode_end.astype(np.int64),
                        [tasks[i] for i in task_ids], len(counts),
                        table[PRIVILEGED].astype(np.float32) if has_privileged else None)


class RealReplay:
    LIVE = "live"

    def __init__(self, datasets: Sequence[Mapping] = (), live: Optional[Mapping] = None, seed: int = 0,
                 fps: Optional[int] = None):
        """``datasets``: [{repo_id, root, weight, key_map, max_episodes, fps}]; ``live``: {repo_id, root, weight, fps} or None
        (no live episodes accepted); ``fps``: the rate every dataset must have (an entry's own ``fps`` wins; None: any)."""
        check_dataset_entries(datasets)
        self.sources: list[ReplaySource] = [
            first_episodes(load_lerobot_source(d.get("name") or d["repo_id"], d["repo_id"], d["root"],
                                               d.get("weight", 1.0), d.get("key_map"), d.get("fps", fps)),
                           d.get("max_episodes"))
            for d in datasets]
        self.live_cfg = dict(live) if live else None
        self.live: Optional[ReplaySource] = None
        if self.live_cfg:
            root = Path(self.live_cfg["root"])
            if (root / "meta" / "info.json").exists():
                self.live = load_lerobot_source(self.LIVE, self.live_cfg["repo_id"], root, self.live_cfg.get("weight", 1.0))
                log.info("re-opened live real dataset %s: %d episodes", root, self.live.num_episodes)
            else:
                self.live = _empty_source(self.LIVE, self.live_cfg.get("weight", 1.0))
            self.sources.append(self.live)
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # in-memory arrays
        self._write_lock = threading.Lock()  # the live dataset on disk
        self._check_compatible()

    def hold_out(self, fraction: float, seed: int = 0) -> Optional["RealReplay"]:
        """Move the last ``floor(fraction * episodes)`` episodes of every on-disk source into a new
        replay (validation frames the training batches never see; a source too small to spare one
        keeps all); None when ``fraction`` is 0."""
        if fraction <= 0:
            return None
        held = []
        with self._lock:
            for i, src in enumerate(self.sources):
                if src is self.live or src.num_episodes < 2:
                    continue
                num_val = min(src.num_episodes - 1, int(np.floor(fraction * src.num_episodes)))
                if num_val < 1:
                    continue
                self.sources[i], val = split_last_episodes(src, num_val)
                held.append(val)
        val = RealReplay(seed=seed)
        val.sources = held
        return val

    @classmethod
    def from_config(cls, cfg, seed: int = 0) -> "RealReplay":
        """From the ``learner`` config: ``real_datasets`` list and ``live_dataset`` mapping."""
        return cls(list(cfg.real_datasets or []), cfg.live_dataset if cfg.live_dataset.root else None, seed,
                   fps=int(cfg.live_dataset.fps))

    def _check_compatible(self) -> None:
        shapes = {(s.image.shape[1:], s.state.shape[1:], s.action.shape[1:]) for s in self.sources if s.num_frames}
        if len(shapes) > 1:
            raise ValueError(f"real sources disagree on (image, state, action) shapes: {sorted(shapes)}")

    # ---- live episodes -----------------------------------------------------------------------
    def add_episode(self, frames: Mapping[str, np.ndarray], task: str) -> None:
        """Persist one demonstration ({our key: [N, ...]}) to the live LeRobot dataset, then replay it."""
        if self.live is None:
            raise RuntimeError("no live_dataset configured: live episodes cannot be stored")
        image = np.asarray(frames[IMAGE], np.uint8)
        state = np.asarray(frames[STATE], np.float32)
        action = np.asarray(frames[ACTION], np.float32)
        n = len(action)
        if n == 0 or len(image) != n or len(state) != n or image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"bad episode: image {image.shape}, state {state.shape}, action {action.shape}")
        for s in self.sources:
            if s.num_frames and (s.image.shape[1:], s.state.shape[1:], s.action.shape[1:]) != (image.shape[1:], state.shape[1:], action.shape[1:]):
                raise ValueError(f"episode shapes {image.shape[1:]}, {state.shape[1:]}, {action.shape[1:]} differ from "
                                 f"source {s.name}'s {s.image.shape[1:]}, {s.state.shape[1:]}, {s.action.shape[1:]}")
        with self._write_lock:
            self._write_live_episode(image, state, action, task)
        with self._lock:
            if self.live.num_frames == 0:  # first episode fixes the shapes of the empty source
                fresh = _empty_source(self.LIVE, self.live.weight, image.shape[1:3], state.shape[1], action.shape[1])
                self.live.image, self.live.state, self.live.action = fresh.image, fresh.state, fresh.action
            self.live.append(image, state, action, task)

    def _write_live_episode(self, image, state, action, task: str) -> None:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
        cfg, root = self.live_cfg, Path(self.live_cfg["root"])
        if (root / "meta" / "info.json").exists():
            ds = LeRobotDataset(cfg["repo_id"], root=root)  # resume: appends a new parquet file
        else:
            features = {
                IMAGE: {"dtype": "image", "shape": image.shape[1:], "names": ["height", "width", "channel"]},
                STATE: {"dtype": "float32", "shape": state.shape[1:], "names": None},
                ACTION: {"dtype": "float32", "shape": action.shape[1:], "names": None},
            }
            ds = LeRobotDataset.create(cfg["repo_id"], int(cfg["fps"]), features, root=root, use_videos=False)
        for i in range(len(action)):
            ds.add_frame({IMAGE: image[i], STATE: state[i], ACTION: action[i], "task": task})
        ds.save_episode()
        ds.finalize()  # closes the parquet writers: the episode is complete on disk now

    # ---- sampling ----------------------------------------------------------------------------
    def sample(self, batch_size: int, chunk_size: int, generator: Optional[np.random.Generator] = None) -> dict:
        """Uniform frames within sources, sources mixed by weight. Returns image uint8 [B,H,W,3],
        state float32 [B,S], actions float32 [B,chunk,A] (the sampled frame's action and the next
        ones; past the episode end the last action repeats and ``action_pad`` [B,chunk] is True),
        task list[str], source list[str]; and privileged float32 [B,P] when some source has
        simulator labels (NaN rows for frames of sources without)."""
        rng = generator if generator is not None else self._rng
        with self._lock:
            sources = [s for s in self.sources if s.num_frames > 0 and s.weight > 0]
            if not sources:
                raise RuntimeError("real replay is empty")
            weights = np.array([s.weight for s in sources], np.float64)
            which = rng.choice(len(sources), size=batch_size, p=weights / weights.sum())
            ref = sources[0]
            out = {
                "image": np.empty((batch_size, *ref.image.shape[1:]), np.uint8),
                "state": np.empty((batch_size, *ref.state.shape[1:]), np.float32),
                "actions": np.empty((batch_size, chunk_size, ref.action.shape[1]), np.float32),
                "action_pad": np.empty((batch_size, chunk_size), bool),
                "task": [""] * batch_size,
                "source": [""] * batch_size,
            }
            labelled = [s.privileged.shape[1] for s in sources if s.privileged is not None]
            if labelled:
                out["privileged"] = np.full((batch_size, labelled[0]), np.nan, np.float32)
            steps = np.arange(chunk_size)
            for k, src in enumerate(sources):
                rows = np.flatnonzero(which == k)
                if rows.size == 0:
                    continue
                frame = rng.integers(0, src.num_frames, size=rows.size)
                end = src.episode_end[frame][:, None]
                future = frame[:, None] + steps
                out["image"][rows] = src.image[frame]
                out["state"][rows] = src.state[frame]
                out["actions"][rows] = src.action[np.minimum(future, end - 1)]
                out["action_pad"][rows] = future >= end
                if src.privileged is not None and "privileged" in out:
                    out["privileged"][rows] = src.privileged[frame]
                for row, t in zip(rows, src.task_index[frame]):
                    out["task"][row] = src.tasks[t]
                    out["source"][row] = src.name
        return out

    # ---- status ------------------------------------------------------------------------------
    def size(self) -> dict:
        with self._lock:
            per_source = {s.name: {"frames": s.num_frames, "episodes": s.num_episodes} for s in self.sources}
        return {"frames": sum(v["frames"] for v in per_source.values()),
                "episodes": sum(v["episodes"] for v in per_source.values()), "sources": per_source}

    def dataset_stats(self) -> dict:
        """Pooled mean/std/min/max of action and state over every frame held, in LeRobot's
        ``meta.stats`` layout ({"action": {...}, "observation.state": {...}}) for the policy normaliser."""
        with self._lock:
            held = [s for s in self.sources if s.num_frames]
            if not held:
                return {}
            stats = {}
            for key, attr in ((ACTION, "action"), (STATE, "state")):
                x = np.concatenate([getattr(s, attr) for s in held]).astype(np.float64)
                if x.shape[1] == 0:
                    continue
                stats[key] = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
                              "count": np.array([len(x)])}
            labelled = [s.privileged for s in held if s.privileged is not None]
            if labelled:
                x = np.concatenate(labelled).astype(np.float64)
                x = x[np.isfinite(x).all(1)]
                if len(x):
                    stats[PRIVILEGED] = {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0),
                                         "count": np.array([len(x)])}
        return stats
