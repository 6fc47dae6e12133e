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
                           "request_id": n})   # ControlServer.reply(..., in_reply_to=request) copies it

The learner must (1) store an episode and remember its id before it answers "stored" for that
id, (2) ignore an episode whose id it already holds (a resend after a lost ack or a collector
restart), and (3) answer every ``episode_ack`` query, with an empty list when it holds none of
the ids. ``ack_reply`` below builds the reply; ``is_ack_request`` recognises the query.

The sender keeps every episode on disk until it is acknowledged (realrobot/outbox.py): it sends
an episode only after the learner answered a query (so nothing piles up in ZeroMQ queues while
the learner is away), and resends an unacknowledged one only when the learner, answering,
still does not hold it ``resend_after_s`` after it was sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from common.protocol import Message

EPISODE_KIND = "episode"
ACK_REQUEST_KIND = "status_request"
ACK_REPLY_KIND = "status"
ACK_QUERY = "episode_ack"
SCHEMA_VERSION = 1

IMAGE_KEY = "observation.image"  # == common.twin.schema.IMAGE_KEY (kept here so the learner's
STATE_KEY = "observation.state"  # decoder does not import the simulator)
ACTION_KEY = "action"
STATE_DIM, ACTION_DIM = 8, 7


class EpisodeFormatError(ValueError):
    pass


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

    def validate(self) -> "Episode":
        t = self.actions.shape[0]
        checks = [
            (self.images.dtype == np.uint8 and self.images.ndim == 4 and self.images.shape[3] == 3,
             f"{IMAGE_KEY} must be uint8 [T,H,W,3], got {self.images.dtype} {self.images.shape}"),
            (self.states.dtype == np.float32 and self.states.shape[1:] == (STATE_DIM,),
             f"{STATE_KEY} must be float32 [T,{STATE_DIM}], got {self.states.dtype} {self.states.shape}"),
            (self.actions.dtype == np.float32 and self.actions.shape[1:] == (ACTION_DIM,),
             f"{ACTION_KEY} must be float32 [T,{ACTION_DIM}], got {self.actions.dtype} {self.actions.shape}"),
            (self.images.shape[0] == self.states.shape[0] == t and t > 0,
             f"frame counts differ or are zero: images {self.images.shape[0]}, "
             f"states {self.states.shape[0]}, actions {t}"),
            (isinstance(self.episode_id, str) and 0 < len(self.episode_id) <= 64,
             f"episode_id {self.episode_id!r} must be a non-empty string"),
        ]
        for ok, why in checks:
            if not ok:
                raise EpisodeFormatError(why)
        return self


def episode_to_message(ep: Episode, sender: str) -> Message:
    ep.validate()
    meta = {"episode_id": ep.episode_id, "task": ep.task, "success": bool(ep.success),
            "fps": int(ep.fps), "num_frames": ep.num_frames, "source": ep.source,
            "schema": SCHEMA_VERSION, **({"extra": ep.extra} if ep.extra else {})}
    return Message(kind=EPISODE_KIND, sender=sender, policy_version=int(ep.policy_version), meta=meta,
                   arrays={IMAGE_KEY: ep.images, STATE_KEY: ep.states, ACTION_KEY: ep.actions})


def message_to_episode(msg: Message) -> Episode:
    """The learner's decoder; raises EpisodeFormatError on a malformed episode message."""
    if msg.kind != EPISODE_KIND:
        raise EpisodeFormatError(f"kind {msg.kind!r} is not {EPISODE_KIND!r}")
    m = msg.meta
    missing = [k for k in ("episode_id", "task", "success", "fps") if k not in m]
    missing += [k for k in (IMAGE_KEY, STATE_KEY, ACTION_KEY) if k not in msg.arrays]
    if missing:
        raise EpisodeFormatError(f"episode message lacks {missing}")
    if m.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise EpisodeFormatError(f"episode schema {m.get('schema')} != {SCHEMA_VERSION}")
    try:
        ep = Episode(episode_id=str(m["episode_id"]), task=str(m["task"]), success=bool(m["success"]),
                     fps=int(m["fps"]), images=msg.arrays[IMAGE_KEY], states=msg.arrays[STATE_KEY],
                     actions=msg.arrays[ACTION_KEY], source=str(m.get("source", "collect")),
                     policy_version=msg.policy_version, extra=dict(m.get("extra", {})))
    except (TypeError, ValueError) as e:
        raise EpisodeFormatError(f"episode meta has a field of the wrong type: {e}") from None
    return ep.validate()


def ack_request(episode_ids: list[str], sender: str = "") -> Message:
    return Message(kind=ACK_REQUEST_KIND, sender=sender,
                   meta={"query": ACK_QUERY, "episode_ids": list(episode_ids)})


def is_ack_request(msg: Message) -> bool:
    return msg.kind == ACK_REQUEST_KIND and msg.meta.get("query") == ACK_QUERY


def ack_reply(request: Message, stored_ids, sender: str = "learner") -> Message:
    """The learner's answer to ``request``: which of its ids are in ``stored_ids`` (a set or a
    callable id -> bool). Send it with ``ControlServer.reply(peer, reply, in_reply_to=request)``."""
    ids = request.meta.get("episode_ids", [])
    holds = stored_ids if callable(stored_ids) else stored_ids.__contains__
    stored = [i for i in ids if isinstance(i, str) and holds(i)]
    return Message(kind=ACK_REPLY_KIND, sender=sender, meta={"query": ACK_QUERY, "stored": stored})


def parse_ack_reply(msg: Message) -> set[str] | None:
    """The stored ids of an ack reply, or None when ``msg`` is not one (e.g. a learner that
    answered the query with its plain status: it does not implement episode_ack)."""
    if msg.kind != ACK_REPLY_KIND or msg.meta.get("query") != ACK_QUERY:
        return None
    stored = msg.meta.get("stored")
    if not isinstance(stored, list):
        return None
    return {i for i in stored if isinstance(i, str)}
