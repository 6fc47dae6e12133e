"""Tandem's wire protocol: one message = a msgpack header frame + one raw frame per array.

Frame 0 is a msgpack map with exactly these fields::

    {"version": 1, "kind": "segment", "sender": "actor-3", "policy_version": 17,
     "meta": {...small scalars/strings/lists...},
     "arrays": [["image", "|u1", [9, 480, 640, 3]], ["reward", "<f4", [8]], ...]}

Frames 1..k hold the C-contiguous bytes of each array, in header order. Arrays are sent with
``copy=False`` and decoded as ``np.frombuffer`` views of the received frames, so a large array
crosses the process boundary without a Python-level copy. A decoded array keeps its frame alive;
it is writable when the frame is (received zmq frames are: the receiver owns them).

Nothing is ever pickled: a peer can only make us allocate numpy arrays of allow-listed dtypes,
within the configured size limits, and every declared shape must match its frame's length.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import zmq

from common.ratelimited_log import RateLimitedLog

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1

KINDS = frozenset({
    "segment",         # a sim trajectory segment, arrays inline (actor on another host)
    "segment_notice",  # a segment waiting in a shared-memory ring slot (actor on the learner's host)
    "episode",         # a real-robot episode from the collector
    "weights",         # a versioned policy snapshot from the learner
    "hello",           # a peer announces itself on the control channel
    "heartbeat",
    "status_request",
    "status",
    "bye",
})

# Little-endian (or byte-order-free) dtypes only: the dtype string on the wire is numpy's
# ``dtype.str``. bfloat16 has no numpy dtype; send it as its uint16 bit pattern plus a meta flag.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    np.dtype(t).newbyteorder("<").str: np.dtype(t).newbyteorder("<")
    for t in ("bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
              "float16", "float32", "float64")
}

HEADER_FIELDS = ("version", "kind", "sender", "policy_version", "meta", "arrays")
_HEADER_FIELD_SET = frozenset(HEADER_FIELDS)
MAX_NAME_LEN = 128
# Seconds between two warnings of one drop reason; the counts between them are summarised.
DROP_LOG_INTERVAL_S = 10.0


class ProtocolError(ValueError):
    """A message that does not follow the protocol. ``reason`` is a short stable code."""

    REASONS = frozenset({
        "not_msgpack", "bad_header", "bad_version", "bad_kind", "frame_count", "dtype",
        "shape_mismatch", "array_too_large", "message_too_large", "too_many_arrays",
        "header_too_large", "bad_name",
    })

    def __init__(self, reason: str, detail: str):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Message:
    kind: str
    sender: str = ""
    policy_version: int = -1
    meta: dict = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


@dataclass
class Limits:
    """What a receiver accepts. Checked before any array is built."""
    max_message_bytes: int = 1 << 30  # all frames of one message together
    max_array_bytes: int = 512 << 20
    max_arrays: int = 256
    max_header_bytes: int = 64 << 10

    @classmethod
    def from_config(cls, cfg: Any, section: str = "limits") -> "Limits":
        """From ``cfg.transport.<section>``, ``cfg.<section>`` or a mapping of the fields
        (missing fields: defaults). The weights channel uses ``section="weights_limits"``."""
        for key in ("transport", section):
            sub = cfg_get(cfg, key)
            if sub is not None:
                cfg = sub
        defaults = cls()
        return cls(**{name: int(cfg_get(cfg, name, getattr(defaults, name)))
                      for name in cls.__dataclass_fields__})


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a dict, an OmegaConf DictConfig or an object; ``default`` when missing."""
    if cfg is None:
        return default
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        try:
            return cfg.get(key, default)
        except TypeError:
            pass
    return getattr(cfg, key, default)


# ----------------------------------------------------------------------------------------------
# encode


def as_wire_array(name: str, a: np.ndarray) -> np.ndarray:
    """The array as it goes on the wire: little-endian, C-contiguous (copies only when it is not)."""
    if isinstance(a, np.generic):
        a = np.asarray(a)
    if not isinstance(a, np.ndarray):
        raise TypeError(f"array {name!r} is a {type(a).__name__}, not a numpy array")
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype.str not in ALLOWED_DTYPES:
        raise ProtocolError("dtype", f"array {name!r} has dtype {a.dtype} ({a.dtype.str}), "
                                     f"allowed: {sorted(ALLOWED_DTYPES)}")
    if not a.flags.c_contiguous:
        a = a.copy(order="C")
    return a


def encode(msg: Message) -> list:
    """Frames of ``msg``: the msgpack header, then one buffer per array (no copy when contiguous)."""
    if msg.kind not in KINDS:
        raise ProtocolError("bad_kind", f"kind {msg.kind!r} is not one of {sorted(KINDS)}")
    descr, buffers = [], []
    for name, a in msg.arrays.items():
        _check_name(name)
        a = as_wire_array(name, a)
        descr.append([name, a.dtype.str, list(a.shape)])
        # A flat uint8 view exposes the bytes under one buffer format, whatever the dtype.
        buffers.append(a.reshape(-1).view(np.uint8))
    header = msgpack.packb({
        "version": PROTOCOL_VERSION,
        "kind": msg.kind,
        "sender": msg.sender,
        "policy_version": int(msg.policy_version),
        "meta": msg.meta,
        "arrays": descr,
    }, use_bin_type=True)
    return [header, *buffers]


# ----------------------------------------------------------------------------------------------
# decode


def _as_buffer(frame: Any) -> memoryview:
    """A flat byte view of a zmq.Frame, bytes, bytearray, memoryview or numpy array."""
    if type(frame) is zmq.Frame:
        return frame.buffer  # already a flat unsigned-byte view
    mv = memoryview(frame)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or not name.isprintable():
        raise ProtocolError("bad_name", f"array name {name!r} must be a printable string of "
                                        f"1..{MAX_NAME_LEN} characters")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_header(h: Any, limits: Limits) -> None:
    if not isinstance(h, dict):
        raise ProtocolError("bad_header", f"header is a msgpack {type(h).__name__}, not a map")
    if h.keys() != _HEADER_FIELD_SET:
        keys = set(h)
        missing, extra = _HEADER_FIELD_SET - keys, keys - _HEADER_FIELD_SET
        raise ProtocolError("bad_header", f"header fields: missing {sorted(missing)}, "
                                          f"unexpected {sorted(map(str, extra))}")
    if not _is_int(h["version"]):
        raise ProtocolError("bad_header", f"version is {type(h['version']).__name__}, not int")
    if h["version"] != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {h['version']}, "
                                           f"this build speaks {PROTOCOL_VERSION}")
    if not isinstance(h["kind"], str):
        raise ProtocolError("bad_header", f"kind is {type(h['kind']).__name__}, not str")
    if h["kind"] not in KINDS:
        raise ProtocolError("bad_kind", f"kind {h['kind']!r} is not one of {sorted(KINDS)}")
    if not isinstance(h["sender"], str):
        raise ProtocolError("bad_header", f"sender is {type(h['sender']).__name__}, not str")
    if not _is_int(h["policy_version"]):
        raise ProtocolError("bad_header",
                            f"policy_version is {type(h['policy_version']).__name__}, not int")
    if not isinstance(h["meta"], dict) or not all(isinstance(k, str) for k in h["meta"]):
        raise ProtocolError("bad_header", "meta must be a map with string keys")
    if not isinstance(h["arrays"], list):
        raise ProtocolError("bad_header", f"arrays is {type(h['arrays']).__name__}, not a list")
    if len(h["arrays"]) > limits.max_arrays:
        raise ProtocolError("too_many_arrays", f"{len(h['arrays'])} arrays, "
                                               f"limit {limits.max_arrays}")


def _check_array_descr(i: int, d: Any, seen: set, limits: Limits) -> tuple[str, np.dtype, tuple, int]:
    if not isinstance(d, list) or len(d) != 3:
        raise ProtocolError("bad_header", f"arrays[{i}] is not a [name, dtype, shape] triple: {d!r:.200}")
    name, dtype_str, shape = d
    _check_name(name)
    if name in seen:
        raise ProtocolError("bad_name", f"array name {name!r} appears twice")
    seen.add(name)
    if not isinstance(dtype_str, str) or dtype_str not in ALLOWED_DTYPES:
        raise ProtocolError("dtype", f"array {name!r} has dtype {dtype_str!r:.40}, "
                                     f"allowed: {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ProtocolError("bad_header", f"array {name!r} shape {shape!r:.200} is not a list of "
                                          "non-negative ints")
    dtype = ALLOWED_DTYPES[dtype_str]
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on hostile shapes
    if nbytes > limits.max_array_bytes:
        raise ProtocolError("array_too_large", f"array {name!r} declares {nbytes} bytes "
                                               f"(shape {shape}, {dtype_str}), limit {limits.max_array_bytes}")
    return name, dtype, tuple(shape), nbytes


def decode(frames: Sequence[Any], limits: Limits = Limits()) -> Message:
    """Validate ``frames`` and build the message; its arrays are views of the frames.

    Raises ProtocolError (with ``.reason``) on anything that does not follow the protocol.
    """
    if len(frames) < 1:
        raise ProtocolError("frame_count", "empty message (no header frame)")
    bufs = [_as_buffer(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > limits.max_message_bytes:
        raise ProtocolError("message_too_large", f"{total} bytes in {len(bufs)} frames, "
                                                 f"limit {limits.max_message_bytes}")
    if bufs[0].nbytes > limits.max_header_bytes:
        raise ProtocolError("header_too_large", f"header frame is {bufs[0].nbytes} bytes, "
                                                f"limit {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(bufs[0], raw=False, use_list=True, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("not_msgpack", f"header frame ({bufs[0].nbytes} bytes) does not "
                                           f"unpack: {type(e).__name__}: {e}") from None
    _check_header(header, limits)

    descr = header["arrays"]
    if len(bufs) != len(descr) + 1:
        raise ProtocolError("frame_count", f"header declares {len(descr)} arrays but the message "
                                           f"has {len(bufs) - 1} array frames")
    seen: set = set()
    checked = [_check_array_descr(i, d, seen, limits) for i, d in enumerate(descr)]
    arrays = {}
    for (name, dtype, shape, nbytes), buf in zip(checked, bufs[1:]):
        if buf.nbytes != nbytes:
            raise ProtocolError("shape_mismatch", f"array {name!r} declares shape {list(shape)} "
                                                  f"{dtype.str} = {nbytes} bytes, frame has {buf.nbytes}")
        arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape)
    return Message(kind=header["kind"], sender=header["sender"],
                   policy_version=header["policy_version"], meta=header["meta"], arrays=arrays)


# ----------------------------------------------------------------------------------------------
# drop accounting


class DropCounter:
    """Counts dropped messages by reason and logs each reason at most once per ``log_interval_s``."""

    def __init__(self, name: str = "transport", log_interval_s: float = DROP_LOG_INTERVAL_S):
        self.name = name
        self.counts: dict[str, int] = {}
        self._log = RateLimitedLog(log, log_interval_s)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, err: ProtocolError | str, peer: Any = "") -> None:
        """Count one drop; ``err`` is a ProtocolError or a reason code such as "stale_version"."""
        reason = err.reason if isinstance(err, ProtocolError) else str(err)
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self._log.warn(f"{self.name}: dropped a message from {peer or '?'}: {err}", key=reason)

    def __repr__(self) -> str:
        return f"DropCounter({self.name!r}, total={self.total}, counts={self.counts})"
