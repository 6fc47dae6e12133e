"""Real-robot episodes on the wire: the collector/deployer -> learner push and its acknowledgement.

Push (data channel, DataSender PUSH -> learner's DataReceiver PULL), one message per episode::

    Message(kind="episode", sender="collector-<host>-<pid>", policy_version=<deploy: the policy's
            version; collect: -1>,
            meta={"episode_id": "<uuid4 hex>",   # unique; the learner de-duplicates on it
                  "task": "put the red cube into the bowl",
                  "success": true,               # the operator's (or the sim's) label
                  "fps": 10, "num_frames": T,
                  "source": "collect" | "deploy",
                  "schema": 1},
            arrays={"observation.image": uint8 [T, H, W, 3],
                    "observation.state": float32 [T, 8],
                    "action": float32 [T, 7]})

Acknowledgement (control channel, ControlClient DEALER -> learner's ControlServer ROUTER): the
sender asks which of its episodes the learner has *stored* (durably in its real replay)::

    request: Message(kind="status_request",
                     meta={"query": "episode_ack", "episode_ids": [id, ...], "request_id": n})
    reply:   Message(kind="status",
                     meta={"query": "episode_ack", "stored": [ids of the request it holds],
                           "rejected": {id: reason},  # ids of the request it refused (never stored)
                           "request_id": n})   # ControlServer.reply(..., in_reply_to=request) copies it

The learner must (1) store an episode and remember its id before it answers "stored" for that
id, (2) ignore an episode whose id it already holds (a resend after a lost ack or a collector
restart), and (3) answer every ``episode_ack`` query, with an empty list when it holds none of
the ids. ``ack_reply`` below builds the reply; ``is_ack_request`` recognises the query.

An episode the learner refuses (its values or layout are wrong: non-finite states or actions, an
image size or fps other than the live dataset's, a success label that is not a boolean) is never
stored; the learner remembers its id and reason, and the ack reply names it under "rejected", so
the sender moves it to its quarantine folder instead of resending it forever.

The sender keeps every episode on disk until it is acknowledged (realrobot/outbox.py): it sends
an episode only after the learner answered a query (so nothing piles up in ZeroMQ queues while
the learner is away), and resends an unacknowledged one only when the learner, answering,
still does not hold it ``resend_after_s`` after it was sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from common.dataset_schema import ACTION_DIM, ACTION_KEY, IMAGE_KEY, STATE_DIM, STATE_KEY
from common.protocol import Message

EPISODE_KIND = "episode"
ACK_REQUEST_KIND = "status_request"
ACK_REPLY_KIND = "status"
ACK_QUERY = "episode_ack"
SCHEMA_VERSION = 1



MAX_FRAMES = 100_000  # frames of one episode (10 Hz: close to three hours)
MAX_EPISODE_ID = 64
MAX_REASON = 200  # characters of a rejection reason sent back to the sender


class EpisodeFormatError(ValueError):
    """A malformed or unacceptable episode; ``reason`` is a short code for drop counters."""

    def __init__(self, message: str, reason: str = "format"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class EpisodeSpec:
    """What the receiving learner accepts beyond the wire format (from its configuration)."""
    image_hw: Optional[tuple[int, int]] = None  # the live dataset's image size (None: any)
    fps: Optional[int] = None  # the live dataset's frame rate (None: any)


def expected_episode_spec(cfg) -> EpisodeSpec:
    """The learner's ``EpisodeSpec`` from the root config: ``learner.live_dataset.image_hw`` (null:
    the env camera's size) and ``learner.live_dataset.fps``."""
    from common.segment import camera_hw

    live = cfg.learner.live_dataset
    return EpisodeSpec(image_hw=tuple(live.image_hw) if live.get("image_hw") else camera_hw(cfg.env),
                       fps=int(live.fps))


@dataclass
class Episode:
    """One recorded episode: T frames of image, state and the action applied after them."""
    episode_id: str
    task: str
    success: bool
    fps: int
    images: np.ndarray  # uint8 [T, H, W, 3]
    states: np.ndarray  # float32 [T, 8]
    actions: np.ndarray  # float32 [T, 7]
    source: str = "collect"
    policy_version: int = -1
    extra: dict = field(default_factory=dict)  # small scalars for the learner's logs

    @property
    def num_frames(self) -> int:
        return int(self.actions.shape[0])

    def validate(self, spec: Optional[EpisodeSpec] = None) -> "Episode":
        t = self.actions.shape[0] if self.actions.ndim >= 1 else 0
        checks = [
            (isinstance(self.episode_id, str) and 0 < len(self.episode_id) <= MAX_EPISODE_ID, "episode_id",
             f"episode_id {self.episode_id!r:.80} must be a string of 1-{MAX_EPISODE_ID} characters"),
            (self.images.dtype == np.uint8 and self.images.ndim == 4 and self.images.shape[3] == 3, "image_layout",
             f"{IMAGE_KEY} must be uint8 [T,H,W,3], got {self.images.dtype} {self.images.shape}"),
            (self.states.dtype == np.float32 and self.states.shape[1:] == (STATE_DIM,), "state_layout",
             f"{STATE_KEY} must be float32 [T,{STATE_DIM}], got {self.states.dtype} {self.states.shape}"),
            (self.actions.dtype == np.float32 and self.actions.shape[1:] == (ACTION_DIM,), "action_layout",
             f"{ACTION_KEY} must be float32 [T,{ACTION_DIM}], got {self.actions.dtype} {self.actions.shape}"),
            (self.images.shape[0] == self.states.shape[0] == t and 0 < t <= MAX_FRAMES, "frame_count",
             f"frame counts differ, are zero or exceed {MAX_FRAMES}: images {self.images.shape[0]}, "
             f"states {self.states.shape[0]}, actions {t}"),
        ]
        for ok, reason, why in checks:
            if not ok:
                raise EpisodeFormatError(why, reason)
        for key, arr in ((STATE_KEY, self.states), (ACTION_KEY, self.actions)):
            if not np.isfinite(arr).all():
                raise EpisodeFormatError(f"{key} holds {int((~np.isfinite(arr)).sum())} non-finite values",
                                         f"non_finite_{key.rsplit('.', 1)[-1]}")
        if spec is not None and spec.image_hw is not None and tuple(self.images.shape[1:3]) != tuple(spec.image_hw):
            raise EpisodeFormatError(f"image size {tuple(self.images.shape[1:3])} is not the live dataset's "
                                     f"{tuple(spec.image_hw)} (env.image_size / env.camera)", "image_size")
        if spec is not None and spec.fps is not None and self.fps != spec.fps:
            raise EpisodeFormatError(f"fps {self.fps} is not the live dataset's {spec.fps} (learner.live_dataset.fps)",
                                     "fps")
        return self


def episode_to_message(ep: Episode, sender: str) -> Message:
    ep.validate()
    meta = {"episode_id": ep.episode_id, "task": ep.task, "success": bool(ep.success),
            "fps": int(ep.fps), "num_frames": ep.num_frames, "source": ep.source,
            "schema": SCHEMA_VERSION, **({"extra": ep.extra} if ep.extra else {})}
    return Message(kind=EPISODE_KIND, sender=sender, policy_version=int(ep.policy_version), meta=meta,
                   arrays={IMAGE_KEY: ep.images, STATE_KEY: ep.states, ACTION_KEY: ep.actions})


def message_to_episode(msg: Message, spec: Optional[EpisodeSpec] = None) -> Episode:
    """The learner's decoder; raises EpisodeFormatError on a malformed or unacceptable episode."""
    if msg.kind != EPISODE_KIND:
        raise EpisodeFormatError(f"kind {msg.kind!r} is not {EPISODE_KIND!r}", "kind")
    m = msg.meta
    missing = [k for k in ("episode_id", "task", "success", "fps") if k not in m]
    missing += [k for k in (IMAGE_KEY, STATE_KEY, ACTION_KEY) if k not in msg.arrays]
    if missing:
        raise EpisodeFormatError(f"episode message lacks {missing}", "missing_field")
    if m.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise EpisodeFormatError(f"episode schema {m.get('schema')!r:.40} != {SCHEMA_VERSION}", "schema")
    success = m["success"]
    if not (isinstance(success, bool) or (isinstance(success, int) and success in (0, 1))):
        raise EpisodeFormatError(f"success {success!r:.40} is not a boolean (true/false or 0/1)", "success_label")
    if isinstance(m["fps"], bool) or not isinstance(m["fps"], int) or not 0 < m["fps"] <= 1000:
        raise EpisodeFormatError(f"fps {m['fps']!r:.40} is not an integer in (0, 1000]", "fps")
    if not isinstance(m["task"], str) or not 0 < len(m["task"]) <= 1000:
        raise EpisodeFormatError("task must be a non-empty instruction of at most 1000 characters", "task")
    if not isinstance(m["episode_id"], str):
        raise EpisodeFormatError(f"episode_id {m['episode_id']!r:.80} is not a string", "episode_id")
    try:
        ep = Episode(episode_id=m["episode_id"], task=m["task"], success=bool(success), fps=m["fps"], images=msg.arrays[IMAGE_KEY],
                     states=msg.arrays[STATE_KEY], actions=msg.arrays[ACTION_KEY], source=str(m.get("source", "collect"))[:32],
                     policy_version=msg.policy_version, extra=dict(m.get("extra", {})))
    except (TypeError, ValueError) as e:
        raise EpisodeFormatError(f"episode meta has a field of the wrong type: {e}", "meta_type") from None
    return ep.validate(spec)


def episode_id_of(msg: Message) -> Optional[str]:
    """The episode id a (possibly rejected) episode message claims, when it is a usable one."""
    i = msg.meta.get("episode_id") if isinstance(msg.meta, dict) else None
    return i if isinstance(i, str) and 0 < len(i) <= MAX_EPISODE_ID else None


def ack_request(episode_ids: list[str], sender: str = "") -> Message:
    return Message(kind=ACK_REQUEST_KIND, sender=sender,
                   meta={"query": ACK_QUERY, "episode_ids": list(episode_ids)})


def is_ack_request(msg: Message) -> bool:
    return msg.kind == ACK_REQUEST_KIND and msg.meta.get("query") == ACK_QUERY


def ack_reply(request: Message, stored_ids, sender: str = "learner", rejected=None) -> Message:
    """The learner's answer to ``request``: which of its ids are in ``stored_ids`` (a set or a
    callable id -> bool), and which it refused (``rejected``: a mapping id -> reason). Send it with
    ``ControlServer.reply(peer, reply, in_reply_to=request)``."""
    ids = request.meta.get("episode_ids", [])
    ids = [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []
    holds = stored_ids if callable(stored_ids) else stored_ids.__contains__
    meta = {"query": ACK_QUERY, "stored": [i for i in ids if holds(i)]}
    if rejected:
        meta["rejected"] = {i: rejected[i] for i in ids if i in rejected}
    return Message(kind=ACK_REPLY_KIND, sender=sender, meta=meta)


def parse_ack_rejections(msg: Message) -> dict[str, str]:
    """{episode id: reason} of the episodes an ack reply says the learner refused."""
    rejected = msg.meta.get("rejected") if isinstance(msg.meta, dict) else None
    if not isinstance(rejected, dict):
        return {}
    return {i: str(r)[:MAX_REASON] for i, r in rejected.items() if isinstance(i, str)}


def parse_ack_reply(msg: Message) -> set[str] | None:
    """The stored ids of an ack reply, or None when ``msg`` is not one (e.g. a learner that
    answered the query with its plain status: it does not implement episode_ack)."""
    if msg.kind != ACK_REPLY_KIND or msg.meta.get("query") != ACK_QUERY:
        return None
    stored = msg.meta.get("stored")
    if not isinstance(stored, list):
        return None
    return {i for i in stored if isinstance(i, str)}
