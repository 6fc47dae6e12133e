import socket
import threading
import time
import uuid

import numpy as np
import pytest
import zmq
from omegaconf import OmegaConf

from common.channels import (ControlClient, ControlServer, DataReceiver, DataSender, SocketOptions,
                             WeightPublisher, WeightSubscriber, as_bind_endpoint, weights_digest)
from common.config import load_config
from common.protocol import Limits, Message, encode
from paths import REPO_ROOT

pytestmark = pytest.mark.timeout(30)

FAST = SocketOptions(linger_ms=0, reconnect_ivl_ms=20, reconnect_ivl_max_ms=100)
TRANSPORT_YAML = REPO_ROOT / "configs" / "transport" / "default.yaml"


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(params=["tcp", "ipc"])
def endpoint(request, tmp_path):
    if request.param == "tcp":
        return free_tcp_endpoint()
    return f"ipc://{tmp_path}/{uuid.uuid4().hex[:8]}.sock"


def segment(i: int) -> Message:
    return Message("segment", sender="actor-0", policy_version=i,
                   arrays={"reward": np.full(4, i, np.float32), "image": np.zeros((2, 8, 8, 3), np.uint8)})


def test_data_round_trip_survives_garbage(endpoint):
    with DataReceiver(endpoint, options=FAST) as rx, DataSender(rx.endpoint, options=FAST) as tx:
        assert tx.send(segment(1), timeout_ms=1000)
        got = rx.recv(timeout_ms=2000)
        assert got is not None and got.policy_version == 1
        np.testing.assert_array_equal(got.arrays["reward"], np.full(4, 1, np.float32))

        raw = tx.socket
        raw.send_multipart([b"not msgpack"])
        raw.send_multipart(encode(segment(2))[:1])  # header without its array frames
        frames = encode(segment(3))
        frames[1] = b"\x00" * 3  # wrong length for the declared shape
        raw.send_multipart(frames)
        assert tx.send(segment(4), timeout_ms=1000)
        got = rx.recv(timeout_ms=2000)  # skips the three bad messages within one call
        assert got is not None and got.policy_version == 4
        assert rx.drops.counts == {"not_msgpack": 1, "frame_count": 1, "shape_mismatch": 1}
        assert rx.recv(timeout_ms=50) is None
        assert rx.received == 2


def test_sender_reports_full_queue_then_delivers_when_learner_starts():
    endpoint = free_tcp_endpoint()
    with DataSender(endpoint, hwm=2, options=FAST) as tx:
        results = [tx.send(segment(i), timeout_ms=20) for i in range(20)]
        assert results[0] and not results[-1]  # no learner: the queue fills, send gives up
        queued = sum(results)
        with DataReceiver(endpoint, options=FAST) as rx:
            got = [rx.recv(timeout_ms=2000) for _ in range(queued)]
        assert [m.policy_version for m in got] == list(range(queued))


def test_oversized_frame_is_never_delivered():
    limits = Limits(max_array_bytes=1024, max_header_bytes=1024)
    with DataReceiver(free_tcp_endpoint(), limits, options=FAST) as rx:
        with DataSender(rx.endpoint, options=FAST) as tx:
            tx.send(Message("segment", arrays={"big": np.zeros(4096, np.uint8)}))
            assert rx.recv(timeout_ms=300) is None
        with DataSender(rx.endpoint, options=FAST) as tx:  # a fresh connection still works
            tx.send(Message("segment", arrays={"small": np.zeros(16, np.uint8)}))
            got = rx.recv(timeout_ms=2000)
        assert got is not None and "small" in got.arrays


def weights(version: int) -> dict:
    return {"w": np.full((64, 64), version, np.float32), "b": np.full(64, version, np.float16)}


def wait_for_subscription(pub: WeightPublisher, sub: WeightSubscriber) -> Message:
    """PUB drops messages until the subscription arrives; publish version 0 until one lands."""
    for _ in range(200):
        pub.publish(0, weights(0))
        got = sub.poll_latest(timeout_ms=10)
        if got is not None:
            return got
    raise AssertionError("subscriber never received a message")


def test_subscriber_returns_only_newest_verified_versions(endpoint):
    with WeightPublisher(endpoint, hwm=100, options=FAST) as pub, \
            WeightSubscriber(pub.endpoint, hwm=100, options=FAST) as sub:
        assert wait_for_subscription(pub, sub).policy_version == 0
        while sub.poll_latest(timeout_ms=50) is not None:
            pass
        for v in range(1, 6):
            pub.publish(v, weights(v))
        time.sleep(0.2)
        got = sub.poll_latest(timeout_ms=1000)
        assert got.policy_version == 5 and sub.skipped_versions >= 4
        assert got.meta["digest"] == weights_digest(5, got.arrays)
        np.testing.assert_array_equal(got.arrays["w"], weights(5)["w"])

        pub.publish(3, weights(3))  # older than what the subscriber has applied
        assert sub.poll_latest(timeout_ms=500) is None
        assert sub.drops.counts.get("stale_version") == 1

        # A tampered snapshot: valid protocol, wrong digest.
        bad = Message("weights", policy_version=9, arrays=weights(9),
                      meta={"digest": weights_digest(8, weights(8)), "publisher_id": pub.publisher_id})
        pub.socket.send_multipart(encode(bad))
        assert sub.poll_latest(timeout_ms=500) is None
        assert sub.drops.counts.get("bad_digest") == 1
        pub.publish(6, weights(6))
        assert sub.poll_latest(timeout_ms=1000).policy_version == 6


def test_subscriber_never_goes_back_or_mixes_versions():
    endpoint = free_tcp_endpoint()
    with WeightPublisher(endpoint, hwm=4, options=FAST) as pub, \
            WeightSubscriber(endpoint, hwm=4, options=FAST) as sub:
        wait_for_subscription(pub, sub)
        last = 50

        def publish_all():
            for v in range(1, last + 1):
                pub.publish(v, weights(v))
                time.sleep(0.002)

        thread = threading.Thread(target=publish_all)
        thread.start()
        seen = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (not seen or seen[-1] != last):
            got = sub.poll_latest(timeout_ms=20)
            if got is not None:
                assert np.all(got.arrays["w"] == got.policy_version)  # one whole version
                assert np.all(got.arrays["b"] == got.policy_version)
                seen.append(got.policy_version)
        thread.join()
        assert seen[-1] == last
        assert all(a < b for a, b in zip(seen, seen[1:]))


def publisher_once_port_is_free(endpoint: str, timeout_s: float = 5.0) -> WeightPublisher:
    """libzmq releases a closed socket's TCP listener asynchronously: a rebind in the same process can
    meet EADDRINUSE for a moment on a loaded machine (a restarted learner is a new process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return WeightPublisher(endpoint, options=FAST)
        except zmq.ZMQError as e:
            if e.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_restarted_publisher_starts_a_new_version_order():
    endpoint = free_tcp_endpoint()
    with WeightSubscriber(endpoint, options=FAST) as sub:
        with WeightPublisher(endpoint, options=FAST) as pub:
            wait_for_subscription(pub, sub)
            pub.publish(10, weights(10))
            assert sub.poll_latest(timeout_ms=1000).policy_version == 10
        with publisher_once_port_is_free(endpoint) as pub:  # a fresh learner, versions from 0
            got = wait_for_subscription(pub, sub)
            assert got.policy_version == 0 and got.meta["publisher_id"] == pub.publisher_id


class EchoServer:
    """A ControlServer in its own thread that answers status requests (optionally late)."""

    def __init__(self, endpoint: str, delay_s: float = 0.0):
        self.endpoint, self.delay_s = endpoint, delay_s
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.served = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def run(self):
        with ControlServer(self.endpoint, options=FAST) as server:
            self.ready.set()
            while not self.stop.is_set():
                got = server.poll(timeout_ms=20)
                if got is None:
                    continue
                peer, msg = got
                time.sleep(self.delay_s)
                self.served += 1
                server.reply(peer, Message("status", sender="learner", policy_version=self.served,
                                           meta={"to": msg.sender}), in_reply_to=msg)

    def close(self):
        self.stop.set()
        self.thread.join(5)


def test_control_request_reply_and_recovery_after_server_restart(endpoint):
    server = EchoServer(endpoint)
    client = ControlClient(endpoint, "actor-7", options=FAST)
    try:
        reply = client.request(Message("status_request"), timeout_ms=2000)
        assert reply is not None and reply.kind == "status" and reply.meta["to"] == "actor-7"
        server.close()

        assert client.request(Message("status_request"), timeout_ms=200) is None
        assert client.resets == 1

        server = EchoServer(endpoint)  # the learner comes back on the same endpoint
        reply = client.request(Message("status_request"), timeout_ms=3000)
        assert reply is not None and reply.kind == "status"
        assert client.send(Message("heartbeat"))
    finally:
        client.close()
        server.close()


def test_late_reply_is_never_taken_for_the_next_one():
    endpoint = free_tcp_endpoint()
    server = EchoServer(endpoint, delay_s=0.3)
    client = ControlClient(endpoint, "actor-8", options=FAST)
    try:
        assert client.request(Message("status_request"), timeout_ms=100) is None  # served late
        reply = client.request(Message("status_request"), timeout_ms=3000)
        assert reply is not None and reply.policy_version == 2  # the answer to request 2
        assert reply.meta["request_id"] == 2
    finally:
        client.close()
        server.close()


def test_control_server_counts_bad_messages():
    with ControlServer(free_tcp_endpoint(), options=FAST) as server:
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(server.endpoint)
        raw.send_multipart([b"\xc1"])
        raw.send_multipart(encode(Message("hello", sender="x")))
        peer, msg = server.poll(timeout_ms=2000)
        assert msg.kind == "hello" and server.drops.counts == {"not_msgpack": 1}
        raw.close()


def test_channels_from_transport_config():
    cfg = OmegaConf.load(TRANSPORT_YAML)
    cfg.data_endpoint, cfg.weights_endpoint = free_tcp_endpoint(), free_tcp_endpoint()
    cfg.linger_ms = 0
    with DataReceiver.from_config(cfg) as rx, DataSender.from_config(cfg) as tx:
        assert rx.socket.getsockopt(zmq.RCVHWM) == cfg.hwm.data_recv
        assert tx.socket.getsockopt(zmq.SNDHWM) == cfg.hwm.data_send
        assert tx.send(segment(1)) and rx.recv(timeout_ms=2000).policy_version == 1
    root = OmegaConf.create({"transport": cfg})
    with WeightPublisher.from_config(root) as pub, WeightSubscriber.from_config(root) as sub:
        assert sub.limits == Limits.from_config(root, "weights_limits")
        assert sub.limits.max_arrays == cfg.weights_limits.max_arrays != cfg.limits.max_arrays
        assert wait_for_subscription(pub, sub).policy_version == 0


def test_transport_config_is_distinct_ipc_sockets_of_one_directory():
    cfg = load_config("config").transport  # the endpoints follow run_dir (tests/common/test_local_ipc.py)
    endpoints = [cfg.data_endpoint, cfg.weights_endpoint, cfg.control_endpoint]
    assert len(set(endpoints)) == 3 and all(e.startswith(f"ipc://{cfg.ipc_dir}/") for e in endpoints)
    assert cfg.ring.full_policy in ("wait", "drop") and cfg.use_shm is True


def test_bind_host_rewrites_tcp_only():
    assert as_bind_endpoint("tcp://learner:5755", "*") == "tcp://*:5755"
    assert as_bind_endpoint("tcp://learner:5755", None) == "tcp://learner:5755"
    assert as_bind_endpoint("ipc:///tmp/x", "*") == "ipc:///tmp/x"
