"""CURVE on Tandem's channels: authorised peers talk, others cannot push, subscribe or ask; the
learner refuses a public bind without keys. Loopback TCP and ipc only."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from common.channels import (ControlClient, ControlServer, DataReceiver, DataSender, SocketOptions,
                             WeightPublisher, WeightSubscriber, check_server_security)
from tools.keys import main as keys_main
from tools.keys import make_keys
from common.protocol import Message
from common.security import (InsecureTransportError, SecurityConfig, SecurityConfigError,
                             endpoint_is_local)
from paths import REPO_ROOT
from processes import stop

pytestmark = pytest.mark.timeout(60)

ROOT = REPO_ROOT
FAST = SocketOptions(linger_ms=0, reconnect_ivl_ms=20, reconnect_ivl_max_ms=100)
DENIED_WAIT_MS = 1500  # long enough for many handshake attempts of a rejected peer


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    make_keys(root / "good", ["actor", "collector"])
    make_keys(root / "other", ["actor"])  # a keypair the learner has never seen
    return root


def transport(keys: Path, client: str = "actor", keys_dir: str = "good", **extra) -> dict:
    return {"data_endpoint": "tcp://127.0.0.1:0", "weights_endpoint": "tcp://127.0.0.1:0",
            "control_endpoint": "tcp://127.0.0.1:0",
            "security": {"enabled": True, "keys_dir": str(keys / keys_dir), "client_name": client, **extra}}


def server_and_client(keys, server_cls, client_cls, client_keys_dir="good", client_enabled=True, **ckw):
    sec = SecurityConfig.from_config(transport(keys))
    server = server_cls("tcp://127.0.0.1:0", options=FAST, security=sec.for_server("tcp://127.0.0.1:0"))
    csec = SecurityConfig.from_config(transport(keys, keys_dir=client_keys_dir))
    client = client_cls(server.endpoint, options=FAST,
                        security=csec.for_client(server.endpoint) if client_enabled else None, **ckw)
    return server, client


def test_endpoint_locality():
    for e in ("ipc:///tmp/x.ipc", "inproc://x", "tcp://127.0.0.1:5755", "tcp://127.8.0.1:1",
              "tcp://localhost:5755", "tcp://[::1]:5755"):
        assert endpoint_is_local(e), e
    for e in ("tcp://*:5755", "tcp://0.0.0.0:5755", "tcp://10.0.0.2:5755", "tcp://learner-host:5755",
              "tcp://[::]:5755", "tcp://eth0:5755"):
        assert not endpoint_is_local(e), e


def test_auto_is_off_on_loopback_and_refuses_a_public_bind_without_keys(keys, tmp_path):
    auto = SecurityConfig.from_config({"security": {"enabled": "auto"}})
    assert auto.for_server("tcp://127.0.0.1:5755") is None and auto.for_server(f"ipc://{tmp_path}/a") is None
    with pytest.raises(InsecureTransportError):
        auto.for_server("tcp://*:5755")
    with pytest.raises(SecurityConfigError):  # a peer pointed at another host needs keys too
        auto.for_client("tcp://10.1.2.3:5755")
    allowed = SecurityConfig.from_config({"security": {"enabled": "auto", "allow_insecure_public": True}})
    assert allowed.for_server("tcp://*:5755") is None
    keyed = SecurityConfig.from_config({"security": {"enabled": "auto", "keys_dir": str(keys / "good"),
                                                  "client_name": "actor"}})
    assert keyed.for_server("tcp://*:5755") is not None and keyed.for_server("tcp://127.0.0.1:1") is None
    assert keyed.for_client("tcp://10.1.2.3:5755") is not None
    with pytest.raises(SecurityConfigError):
        SecurityConfig.from_config({"security": {"enabled": True}}).for_server("ipc:///tmp/a")
    with pytest.raises(InsecureTransportError):
        check_server_security({"data_endpoint": "tcp://h:1", "weights_endpoint": "tcp://h:2",
                               "control_endpoint": "tcp://h:3", "bind_host": "*"})


def test_keys_command_writes_pairs_and_prints_paths(tmp_path, capsys):
    assert keys_main(["--dir", str(tmp_path / "k"), "--clients", "a1", "robot"]) == 0
    out = capsys.readouterr().out
    for rel in ("learner/server.key_secret", "learner/server.key", "peers/a1.key_secret", "peers/robot.key_secret"):
        assert (tmp_path / "k" / rel).is_file() and str(tmp_path / "k" / rel) in out
    assert sorted(p.name for p in (tmp_path / "k/authorized_clients").iterdir()) == ["a1.key", "robot.key"]
    assert oct(os.stat(tmp_path / "k/peers/a1.key_secret").st_mode & 0o777) == "0o600"
    secret_before = (tmp_path / "k/learner/server.key_secret").read_bytes()
    assert keys_main(["--dir", str(tmp_path / "k"), "--clients", "a1"]) == 0  # keeps existing keys
    assert (tmp_path / "k/learner/server.key_secret").read_bytes() == secret_before
    assert keys_main(["--dir", str(tmp_path / "k"), "--clients", "../evil"]) == 2


def seg(i):
    return Message("segment", sender="a", policy_version=i, arrays={"reward": np.full(4, i, np.float32)})


@pytest.mark.parametrize("who", ["authorised", "unknown_key", "plain"])
def test_data_push_needs_an_authorised_key(keys, who):
    rx, tx = server_and_client(keys, DataReceiver, DataSender, client_keys_dir="other" if who == "unknown_key" else "good",
                               client_enabled=who != "plain")
    with rx, tx:
        tx.send(seg(1), timeout_ms=200)
        got = rx.recv(timeout_ms=DENIED_WAIT_MS if who != "authorised" else 5000)
        if who == "authorised":
            assert got is not None and got.policy_version == 1
        else:
            assert got is None and rx.received == 0


@pytest.mark.parametrize("who", ["authorised", "unknown_key"])
def test_weights_reach_only_authorised_subscribers(keys, who):
    pub, sub = server_and_client(keys, WeightPublisher, WeightSubscriber,
                                 client_keys_dir="other" if who == "unknown_key" else "good")
    with pub, sub:
        got, deadline = None, time.monotonic() + (DENIED_WAIT_MS if who != "authorised" else 5000) / 1000
        while got is None and time.monotonic() < deadline:  # PUB drops until the SUB is joined
            pub.publish(3, {"w": np.arange(8, dtype=np.float32)})
            got = sub.poll_latest(timeout_ms=100)
        assert (got is not None and got.policy_version == 3) == (who == "authorised")


@pytest.mark.parametrize("who", ["authorised", "unknown_key", "plain"])
def test_status_query_needs_an_authorised_key(keys, who):
    server, client = server_and_client(keys, ControlServer, ControlClient,
                                       client_keys_dir="other" if who == "unknown_key" else "good",
                                       client_enabled=who != "plain", identity="peer")
    import threading
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            req = server.poll(timeout_ms=20)
            if req is not None:
                server.reply(req[0], Message("status", sender="learner", meta={"ok": 1}), in_reply_to=req[1])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        reply = client.request(Message("status_request"), timeout_ms=5000 if who == "authorised" else DENIED_WAIT_MS)
        assert (reply is not None and reply.meta["ok"] == 1) == (who == "authorised")
    finally:
        stop.set()
        t.join()
        client.close()
        server.close()


def test_from_config_secures_ipc_when_enabled(keys, tmp_path):
    t = OmegaConf.create({"data_endpoint": f"ipc://{tmp_path}/d.ipc", "linger_ms": 0, "reconnect_ivl_ms": 20,
                          "security": {"enabled": "true", "keys_dir": str(keys / "good"), "client_name": "collector"}})
    with DataReceiver.from_config(t) as rx, DataSender.from_config(t) as tx:
        assert rx.security is not None and tx.security is not None
        assert tx.send(seg(7), timeout_ms=1000)
        got = rx.recv(timeout_ms=5000)
        assert got is not None and got.policy_version == 7


def test_learner_refuses_public_bind_without_keys(tmp_path):
    # check_server_security runs first in Learner.__init__: nothing is bound, nothing loaded.
    tcp = [f"transport.{k}_endpoint=tcp://learner-host:{port}" for k, port in (("data", 5755), ("weights", 5756),
                                                                                 ("control", 5757))]
    p = subprocess.run([sys.executable, "-m", "learner.main", f"run_dir={tmp_path}", "device=cpu", *tcp,
                        "transport.bind_host=*"], cwd=ROOT, capture_output=True, text=True, timeout=50,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode != 0
    assert "InsecureTransportError" in p.stderr and "allow_insecure_public" in p.stderr


def test_live_learner_with_curve_answers_only_authorised_peers(keys, tmp_path):
    """learner.main with transport.security on (ipc): an authorised status query is answered; a
    peer with an unknown key gets no status and its pushed messages never reach the receiver."""
    from common.config import load_config

    eps = [f"transport.{k}_endpoint=ipc://{tmp_path}/{k}.ipc" for k in ("data", "weights", "control")]
    sec = ["transport.security.enabled=true", f"transport.security.keys_dir={keys / 'good'}",
           "transport.security.client_name=actor"]
    learner = subprocess.Popen([sys.executable, "-m", "learner.main", f"run_dir={tmp_path}/run", "device=cpu",
                                "policy=tiny", *eps, *sec], cwd=ROOT, stdout=open(tmp_path / "learner.log", "wb"),
                               stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        good_cfg = load_config("config", [*eps, *sec])
        bad_cfg = load_config("config", [*eps, *sec[:1], f"transport.security.keys_dir={keys / 'other'}",
                                         "transport.security.client_name=actor"])

        def ask(cfg, timeout_ms):
            with ControlClient.from_config(cfg.transport, identity="probe") as c:
                return c.request(Message("status_request"), timeout_ms=timeout_ms)

        first, deadline = None, time.monotonic() + 40
        while first is None and time.monotonic() < deadline and learner.poll() is None:
            first = ask(good_cfg, 1000)
        assert first is not None, (tmp_path / "learner.log").read_text()[-2000:]
        with DataSender.from_config(bad_cfg.transport) as intruder:
            for _ in range(3):  # each would be counted (bad_ring, unexpected_kind:hello) if it arrived
                intruder.send(Message("segment_notice", sender="intruder", meta={"ring": "nowhere"}), timeout_ms=100)
                intruder.send(Message("hello", sender="intruder"), timeout_ms=100)
            assert ask(bad_cfg, DENIED_WAIT_MS) is None
        after = ask(good_cfg, 3000)
        assert after is not None
        assert after.meta["dropped"] == first.meta["dropped"]  # nothing of the intruder's was received
        assert "intruder" not in after.meta["actors"]
    finally:
        stop(learner)
