"""ZeroMQ channels between Tandem's processes, one small class per socket role.

    data     DataSender (actor, collector: PUSH, connects)  ->  DataReceiver (learner: PULL, binds)
    weights  WeightPublisher (learner: PUB, binds)          ->  WeightSubscriber (actor, deployer: SUB)
    control  ControlClient (any peer: DEALER, connects)     <-> ControlServer (learner: ROUTER, binds)

The learner binds every socket and peers connect, so processes can start in any order and
ZeroMQ reconnects a peer when the learner comes back. Every socket has a finite LINGER, so
``close()`` never hangs. A socket belongs to the thread that created it.

Received messages are validated by ``protocol.decode``; a bad one is dropped and counted in the
channel's ``drops`` (a DropCounter) and never raised to the caller.

Security (common/security.py): every channel takes an optional ``security``: a ServerSecurity
for the learner's binding sockets, a ClientSecurity for the peers' connecting ones (CURVE).
``from_config`` derives it from ``transport.security`` (off on ipc/loopback by default, on for a
public address, and a public bind without keys is refused); constructors default to plain sockets.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from common import local_ipc
from common.protocol import (DropCounter, Limits, Message, ProtocolError, as_wire_array, cfg_get,
                             decode, encode)
from common.security import ClientSecurity, SecurityConfig, ServerSecurity

# Defaults of configs/transport/default.yaml, for callers that build a channel without a config.
DEFAULT_HWM = {"data_send": 8, "data_recv": 64, "weights_send": 2, "weights_recv": 4, "control": 1000}
DEFAULT_SEND_TIMEOUT_MS = 1000
DEFAULT_REQUEST_TIMEOUT_MS = 2000


def transport_config(cfg: Any) -> Any:
    """The ``transport`` group of a root config, or ``cfg`` itself when it already is that group."""
    sub = cfg_get(cfg, "transport")
    return cfg if sub is None else sub


@dataclass
class SocketOptions:
    linger_ms: int = 500  # how long close() may wait to flush queued messages
    reconnect_ivl_ms: int = 100
    reconnect_ivl_max_ms: int = 2000
    # ZMTP heartbeats let a connecting peer notice a learner host that vanished without closing
    # its TCP connection (power loss, cable) and reconnect. 0 disables them: the default, since
    # libzmq 4.3 can abort on a PING reaching a socket at its HWM (configs/transport/default.yaml).
    heartbeat_ivl_ms: int = 0
    heartbeat_timeout_ms: int = 5000

    @classmethod
    def from_config(cls, cfg: Any) -> "SocketOptions":
        t, d = transport_config(cfg), cls()
        return cls(
            linger_ms=int(cfg_get(t, "linger_ms", d.linger_ms)),
            reconnect_ivl_ms=int(cfg_get(t, "reconnect_ivl_ms", d.reconnect_ivl_ms)),
            reconnect_ivl_max_ms=int(cfg_get(t, "reconnect_ivl_max_ms", d.reconnect_ivl_max_ms)),
            heartbeat_ivl_ms=int(cfg_get(t, "zmq_heartbeat_ivl_ms", d.heartbeat_ivl_ms)),
            heartbeat_timeout_ms=int(cfg_get(t, "zmq_heartbeat_timeout_ms", d.heartbeat_timeout_ms)),
        )


def _hwm(cfg: Any, key: str) -> int:
    return int(cfg_get(cfg_get(transport_config(cfg), "hwm"), key, DEFAULT_HWM[key]))


def as_bind_endpoint(endpoint: str, bind_host: str | None = None) -> str:
    """The endpoint to bind: ``endpoint`` with its tcp host replaced by ``bind_host`` when given.

    Peers connect to e.g. "tcp://learner-host:5755"; the learner binds "tcp://*:5755" with
    ``bind_host="*"`` to accept connections on every interface.
    """
    if not bind_host or not endpoint.startswith("tcp://"):
        return endpoint
    _, port = endpoint[len("tcp://"):].rsplit(":", 1)
    return f"tcp://{bind_host}:{port}"


def bind_socket(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the endpoint actually bound ("tcp://127.0.0.1:*" picks a free port). An ipc
    path gets its missing directories with mode 0700, and a live listener there is refused."""
    path = local_ipc.ipc_path(endpoint)
    if path is not None and not path.startswith("@"):
        local_ipc.make_private_dirs(Path(os.path.abspath(path)).parent)
        local_ipc.check_unbound(endpoint)
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-1] + "*"
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class _Channel:
    """One socket with Tandem's common options; a context manager that closes it."""

    socket_type: int

    def __init__(self, endpoint: str, *, options: SocketOptions | None = None, name: str = "",
                 security: ServerSecurity | ClientSecurity | None = None):
        self.options = options or SocketOptions()
        self.endpoint = endpoint
        self.name = name or type(self).__name__
        self.security = security
        self.socket = self._new_socket()

    def _new_socket(self) -> zmq.Socket:
        o = self.options
        sock = zmq.Context.instance().socket(self.socket_type)
        sock.setsockopt(zmq.LINGER, o.linger_ms)
        sock.setsockopt(zmq.RECONNECT_IVL, o.reconnect_ivl_ms)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, o.reconnect_ivl_max_ms)
        if o.heartbeat_ivl_ms > 0:
            sock.setsockopt(zmq.HEARTBEAT_IVL, o.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, o.heartbeat_timeout_ms)
        if self.security is not None:
            self.security.apply(sock)  # CURVE options must precede bind/connect
        return sock

    def close(self) -> None:
        if not self.socket.closed:
            self.socket.close(linger=self.options.linger_ms)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _limit_frame_size(sock: zmq.Socket, limits: Limits) -> None:
    # ZeroMQ drops the connection of a peer that sends a larger frame, before allocating it.
    sock.setsockopt(zmq.MAXMSGSIZE, max(limits.max_array_bytes, limits.max_header_bytes))


def _server_security(t: Any, endpoint: str, kw: dict) -> ServerSecurity | None:
    """``kw["security"]`` when the caller passed one, else what ``transport.security`` says for a
    socket binding ``endpoint`` (raises when a public bind has no keys and is not allowed)."""
    if "security" in kw:
        return kw.pop("security")
    return SecurityConfig.from_config(t).for_server(as_bind_endpoint(endpoint, cfg_get(t, "bind_host")))


def check_server_security(cfg: Any) -> dict[str, bool]:
    """For the learner, before it loads anything: raise InsecureTransportError (or
    SecurityConfigError) now if one of its three binds would be refused; else endpoint -> CURVE on."""
    t = transport_config(cfg)
    sec = SecurityConfig.from_config(t)
    bind_host = cfg_get(t, "bind_host")
    ends = {k: as_bind_endpoint(cfg_get(t, f"{k}_endpoint"), bind_host) for k in ("data", "weights", "control")}
    for k, e in ends.items():
        if bind_host and not e.startswith("tcp://"):
            raise ValueError(f"transport.bind_host={bind_host!r} applies to tcp endpoints, but transport.{k}_endpoint "
                             f"is {e} (this host only): for peers on other hosts set transport.{k}_endpoint="
                             "tcp://<learner-host>:<port> on every process")
    return {e: sec.for_server(e) is not None for e in ends.values()}


def _client_security(t: Any, endpoint: str, kw: dict) -> ClientSecurity | None:
    if "security" in kw:
        return kw.pop("security")
    return SecurityConfig.from_config(t).for_client(endpoint)


def _remaining_ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))


# ----------------------------------------------------------------------------------------------
# data: actors and collector -> learner


class DataSender(_Channel):
    """PUSH that connects to the learner's data endpoint.

    Arrays are handed to ZeroMQ without a copy: do not write into an array after sending it
    (send fresh arrays, or copies of buffers you reuse). Queued messages wait for the learner
    across its restarts; when ``hwm`` messages are queued, ``send`` waits up to its timeout.
    """

    socket_type = zmq.PUSH

    def __init__(self, endpoint: str, *, hwm: int = DEFAULT_HWM["data_send"],
                 send_timeout_ms: int = DEFAULT_SEND_TIMEOUT_MS,
                 options: SocketOptions | None = None, name: str = "", security: ClientSecurity | None = None):
        super().__init__(endpoint, options=options, name=name, security=security)
        self.send_timeout_ms = send_timeout_ms
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.connect(endpoint)
        self.sent = 0
        self.sent_bytes = 0

    @classmethod
    def from_config(cls, cfg: Any, **kw) -> "DataSender":
        t = transport_config(cfg)
        security = _client_security(t, t.data_endpoint, kw)
        return cls(t.data_endpoint, hwm=_hwm(t, "data_send"),
                   send_timeout_ms=int(cfg_get(t, "send_timeout_ms", DEFAULT_SEND_TIMEOUT_MS)),
                   options=SocketOptions.from_config(t), security=security, **kw)

    def send(self, msg: Message, timeout_ms: int | None = None) -> bool:
        """Queue ``msg``; False when the queue stayed full for ``timeout_ms`` (nothing was sent)."""
        frames = encode(msg)
        timeout_ms = self.send_timeout_ms if timeout_ms is None else timeout_ms
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                # A multipart message is atomic: either every frame is queued or none.
                self.socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.sent += 1
                self.sent_bytes += msg.nbytes()
                return True
            except zmq.Again:
                left = _remaining_ms(deadline)
                if left <= 0 or not self.socket.poll(left, zmq.POLLOUT):
                    return False


class DataReceiver(_Channel):
    """PULL that binds the learner's data endpoint; bad messages are dropped and counted."""

    socket_type = zmq.PULL

    def __init__(self, endpoint: str, limits: Limits | None = None, *, hwm: int = DEFAULT_HWM["data_recv"],
                 bind_host: str | None = None, options: SocketOptions | None = None, name: str = "",
                 security: ServerSecurity | None = None):
        super().__init__(endpoint, options=options, name=name, security=security)
        self.limits = limits or Limits()
        self.drops = DropCounter(self.name)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        _limit_frame_size(self.socket, self.limits)
        self.endpoint = bind_socket(self.socket, as_bind_endpoint(endpoint, bind_host))
        self.received = 0
        self.received_bytes = 0

    @classmethod
    def from_config(cls, cfg: Any, **kw) -> "DataReceiver":
        t = transport_config(cfg)
        security = _server_security(t, t.data_endpoint, kw)
        return cls(t.data_endpoint, Limits.from_config(t), hwm=_hwm(t, "data_recv"),
                   bind_host=cfg_get(t, "bind_host"), options=SocketOptions.from_config(t),
                   security=security, **kw)

    def recv(self, timeout_ms: int = 0) -> Message | None:
        """The next valid message, or None when none arrived within ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000
        while self.socket.poll(_remaining_ms(deadline), zmq.POLLIN):
            frames = self.socket.recv_multipart(copy=False)
            try:
                msg = decode(frames, self.limits)
            except ProtocolError as e:
                self.drops.record(e, peer=self.endpoint)
                continue
            self.received += 1
            self.received_bytes += msg.nbytes()
            return msg
        return None


# ----------------------------------------------------------------------------------------------
# weights: learner -> actors and deployer


def weights_digest(version: int, arrays: dict[str, np.ndarray]) -> str:
    """blake2b over the version, every array's name, dtype and shape, and every array's bytes."""
    h = hashlib.blake2b(digest_size=32)
    wire = {name: as_wire_array(name, a) for name, a in arrays.items()}
    h.update(msgpack.packb([int(version), [[n, a.dtype.str, list(a.shape)] for n, a in wire.items()]]))
    for a in wire.values():
        h.update(a.reshape(-1).view(np.uint8))  # hashlib releases the GIL on large buffers
    return h.hexdigest()


class WeightPublisher(_Channel):
    """PUB that binds the learner's weights endpoint and broadcasts versioned snapshots.

    A snapshot is one multipart message, so ZeroMQ delivers it whole or not at all. The meta
    carries the digest and this publisher's random id, so subscribers restart their version
    order when a new learner process starts publishing.
    """

    socket_type = zmq.PUB

    def __init__(self, endpoint: str, *, hwm: int = DEFAULT_HWM["weights_send"], bind_host: str | None = None,
                 options: SocketOptions | None = None, name: str = "", sender: str = "learner",
                 security: ServerSecurity | None = None):
        super().__init__(endpoint, options=options, name=name, security=security)
        self.sender = sender
        self.publisher_id = secrets.token_hex(8)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.endpoint = bind_socket(self.socket, as_bind_endpoint(endpoint, bind_host))

    @classmethod
    def from_config(cls, cfg: Any, **kw) -> "WeightPublisher":
        t = transport_config(cfg)
        security = _server_security(t, t.weights_endpoint, kw)
        return cls(t.weights_endpoint, hwm=_hwm(t, "weights_send"), bind_host=cfg_get(t, "bind_host"),
                   options=SocketOptions.from_config(t), security=security, **kw)

    def publish(self, version: int, arrays: dict[str, np.ndarray], meta: dict | None = None) -> str:
        """Broadcast one version (arrays must not change until sent); returns its digest."""
        wire = {name: as_wire_array(name, a) for name, a in arrays.items()}
        digest = weights_digest(version, wire)
        meta = {**(meta or {}), "digest": digest, "publisher_id": self.publisher_id}
        msg = Message("weights", sender=self.sender, policy_version=int(version), meta=meta, arrays=wire)
        self.socket.send_multipart(encode(msg), copy=False)  # PUB never blocks: full queues drop
        return digest


class WeightSubscriber(_Channel):
    """SUB that connects to the weights endpoint and yields only whole, verified, newer versions."""

    socket_type = zmq.SUB

    def __init__(self, endpoint: str, limits: Limits | None = None, *, hwm: int = DEFAULT_HWM["weights_recv"],
                 options: SocketOptions | None = None, name: str = "", security: ClientSecurity | None = None):
        super().__init__(endpoint, options=options, name=name, security=security)
        self.limits = limits or Limits()
        self.drops = DropCounter(self.name)
        self.skipped_versions = 0  # valid versions superseded by a newer one in the same drain
        self.resends = 0  # the current version received again (periodic re-publish)
        self.last_version: int | None = None
        self.last_publisher: str | None = None
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        _limit_frame_size(self.socket, self.limits)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.connect(endpoint)

    @classmethod
    def from_config(cls, cfg: Any, **kw) -> "WeightSubscriber":
        t = transport_config(cfg)
        security = _client_security(t, t.weights_endpoint, kw)
        return cls(t.weights_endpoint, Limits.from_config(t, "weights_limits"), hwm=_hwm(t, "weights_recv"),
                   options=SocketOptions.from_config(t), security=security, **kw)

    def _is_newer(self, msg: Message, than: Message | None) -> bool:
        version = than.policy_version if than is not None else self.last_version
        publisher = than.meta.get("publisher_id") if than is not None else self.last_publisher
        if version is None or msg.meta.get("publisher_id") != publisher:
            return True  # first version, or a restarted learner (its versions start over)
        return msg.policy_version > version

    def poll_latest(self, timeout_ms: int = 0) -> Message | None:
        """Drain pending snapshots; the newest one if it is newer than the last returned and its
        digest verifies, else None. Waits up to ``timeout_ms`` for the first one."""
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return None
        best: Message | None = None
        while True:
            try:
                frames = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                msg = decode(frames, self.limits)
            except ProtocolError as e:
                self.drops.record(e, peer=self.endpoint)
                continue
            if msg.kind != "weights":
                self.drops.record("wrong_kind", peer=self.endpoint)
            elif msg.policy_version == self.last_version and msg.meta.get("publisher_id") == self.last_publisher:
                self.resends += 1  # the learner re-sends its current version for late joiners: not an error
            elif not self._is_newer(msg, None):
                self.drops.record("stale_version", peer=self.endpoint)
            elif best is None or self._is_newer(msg, best):
                self.skipped_versions += best is not None
                best = msg
            else:
                self.skipped_versions += 1
        if best is None:
            return None
        digest = best.meta.get("digest")
        if not isinstance(digest, str) or digest != weights_digest(best.policy_version, best.arrays):
            self.drops.record("bad_digest", peer=self.endpoint)
            return None
        self.last_version = best.policy_version
        self.last_publisher = best.meta.get("publisher_id")
        return best


# ----------------------------------------------------------------------------------------------
# control: hello / heartbeat / status between the learner and every peer


class ControlServer(_Channel):
    """ROUTER that binds the learner's control endpoint."""

    socket_type = zmq.ROUTER

    def __init__(self, endpoint: str, limits: Limits | None = None, *, hwm: int = DEFAULT_HWM["control"],
                 bind_host: str | None = None, options: SocketOptions | None = None, name: str = "",
                 security: ServerSecurity | None = None):
        super().__init__(endpoint, options=options, name=name, security=security)
        self.limits = limits or Limits()
        self.drops = DropCounter(self.name)
        self.socket.setsockopt(zmq.SNDHWM, hwm)
        self.socket.setsockopt(zmq.RCVHWM, hwm)
        # A peer that reconnects with an identity still known here takes that identity over.
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        _limit_frame_size(self.socket, self.limits)
        self.endpoint = bind_socket(self.socket, as_bind_endpoint(endpoint, bind_host))

    @classmethod
    def from_config(cls, cfg: Any, **kw) -> "ControlServer":
        t = transport_config(cfg)
        security = _server_security(t, t.control_endpoint, kw)
        return cls(t.control_endpoint, Limits.from_config(t), hwm=_hwm(t, "control"),
                   bind_host=cfg_get(t, "bind_host"), options=SocketOptions.from_config(t),
                   security=security, **kw)

    def poll(self, timeout_ms: int = 0) -> tuple[bytes, Message] | None:
        """(peer routing identity, message) of the next valid message, or None on timeout."""
        deadline = time.monotonic() + timeout_ms / 1000
        while self.socket.poll(_remaining_ms(deadline), zmq.POLLIN):
            peer, *frames = self.socket.recv_multipart(copy=False)
            peer = peer.bytes
            try:
                return peer, decode(frames, self.limits)
            except ProtocolError as e:
                self.drops.record(e, peer=peer)
        return None

    def reply(self, peer: bytes, msg: Message, in_reply_to: Message | None = None) -> None:
        """Send ``msg`` to ``peer``; dropped silently if the peer is gone. Pass the request as
        ``in_reply_to`` so the client can match the reply to it."""
        if in_reply_to is not None and "request_id" in in_reply_to.meta:
            msg = replace(msg, meta={**msg.meta, "request_id": in_reply_to.meta["request_id"]})
        try:
            self.socket.send_multipart([peer, *encode(msg)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.drops.record("reply_queue_full", peer=peer)


class ControlClient(_Channel):
    """DEALER that connects to the learner's control endpoint.

    ``identity`` names the peer (the message's sender). The socket's routing identity is unique
    per socket, and a timed-out request replaces the socket, so a late reply to an abandoned
    request can never be taken for the answer to a newer one.
    """

    socket_type = zmq.DEALER

    def __init__(self, endpoint: str, identity: str, limits: Limits | None = None, *,
                 hwm: int = DEFAULT_HWM["control"], request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
                 options: SocketOptions | None = None, security: ClientSecurity | None = None):
        self.identity = identity
        self.limits = limits or Limits()
        self.hwm = hwm
        self.request_timeout_ms = request_timeout_ms
        self.drops = DropCounter(f"control:{identity}")
        self.resets = 0
        self._request_id = 0
        super().__init__(endpoint, options=options, name=identity, security=security)

    @classmethod
    def from_config(cls, cfg: Any, identity: str, **kw) -> "ControlClient":
        t = transport_config(cfg)
        security = _client_security(t, t.control_endpoint, kw)
        return cls(t.control_endpoint, identity, Limits.from_config(t), hwm=_hwm(t, "control"),
                   request_timeout_ms=int(cfg_get(t, "request_timeout_ms", DEFAULT_REQUEST_TIMEOUT_MS)),
                   options=SocketOptions.from_config(t), security=security, **kw)

    def _new_socket(self) -> zmq.Socket:
        sock = super()._new_socket()
        routing_id = f"{self.identity}/{os.getpid()}/{secrets.token_hex(4)}"
        sock.setsockopt(zmq.ROUTING_ID, routing_id.encode())
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        _limit_frame_size(sock, self.limits)
        sock.connect(self.endpoint)
        return sock

    def _reset_socket(self) -> None:
        self.socket.close(linger=0)  # abandon queued requests; their replies go nowhere
        self.socket = self._new_socket()
        self.resets += 1

    def send(self, msg: Message) -> bool:
        """Fire and forget (heartbeat, bye); False when the send queue is full."""
        if not msg.sender:
            msg = replace(msg, sender=self.identity)
        try:
            self.socket.send_multipart(encode(msg), flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def request(self, msg: Message, timeout_ms: int | None = None) -> Message | None:
        """Send ``msg`` and wait for its reply; None (and a fresh socket) when none came in time."""
        timeout_ms = self.request_timeout_ms if timeout_ms is None else timeout_ms
        self._request_id += 1
        request_id = self._request_id
        msg = replace(msg, meta={**msg.meta, "request_id": request_id})
        deadline = time.monotonic() + timeout_ms / 1000
        if self.send(msg):
            while self.socket.poll(_remaining_ms(deadline), zmq.POLLIN):
                frames = self.socket.recv_multipart(copy=False)
                try:
                    reply = decode(frames, self.limits)
                except ProtocolError as e:
                    self.drops.record(e, peer=self.endpoint)
                    continue
                if reply.meta.get("request_id", request_id) != request_id:
                    self.drops.record("stale_reply", peer=self.endpoint)
                    continue
                return reply
        self._reset_socket()
        return None
