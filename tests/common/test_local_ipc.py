"""The single-host default (issue #18): ipc endpoints in a per-user, per-run directory of mode
0700, refused when another local user could reach them, rings in /dev/shm of mode 0600, and a
live learner and actor meeting on those defaults. The other-user checks run as root only (they
switch a forked child to the user nobody)."""
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from common.channels import DataReceiver, check_server_security
from common.config import load_config
from tools.fuzz import LEARNER_OVERRIDES, learner_status
from common.local_ipc import EndpointInUseError
from common.security import InsecureTransportError, SecurityConfig
from common.shm_ring import SHM_DIR, ShmRingWriter, reap_dead_rings
from tools.synthetic import poll_until, spec_from_config
from processes import stop
from paths import REPO_ROOT

pytestmark = pytest.mark.timeout(120)

ROOT = REPO_ROOT
NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
AUTO = SecurityConfig.from_config({"security": {"enabled": "auto"}})


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def shared_tmp():
    """A world-writable sticky directory outside pytest's private tree: what /tmp is to every user."""
    d = Path(tempfile.mkdtemp(prefix="tandem-test-shared-", dir="/tmp"))
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def connect_as(uid: int, path: str) -> str:
    """Connect to the Unix socket ``path`` from a child process running as ``uid``."""
    pid = os.fork()
    if pid == 0:  # the child only makes syscalls and leaves with os._exit
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(path)
            code = 0
        except PermissionError:
            code = 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "connected", 1: "denied"}.get(os.waitstatus_to_exitcode(status), "error")


def test_default_endpoints_are_ipc_in_a_0700_directory_per_user_and_run(tmp_path, shared_tmp, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(shared_tmp))  # the default's base, as if it were /tmp
    a, b = (load_config("config", [f"run_dir={tmp_path / name}"]).transport for name in ("a", "b"))
    base = shared_tmp / f"tandem-{os.getuid()}"
    for t in (a, b):
        assert Path(t.ipc_dir).parent == base
        for k in ("data", "weights", "control"):
            assert getattr(t, f"{k}_endpoint") == f"ipc://{t.ipc_dir}/{k}.ipc"
    assert a.ipc_dir != b.ipc_dir  # two concurrent runs never share a socket
    assert not base.exists()
    assert check_server_security(a) == {a.data_endpoint: False, a.weights_endpoint: False, a.control_endpoint: False}
    assert mode(base) == mode(a.ipc_dir) == 0o700 and os.stat(a.ipc_dir).st_uid == os.getuid()

    # a base directory that another user could write into is refused, not used
    os.chmod(base, 0o777)
    with pytest.raises(InsecureTransportError, match="lets another user replace"):
        check_server_security(a)
    with pytest.raises(InsecureTransportError):  # a peer refuses to connect there as well
        AUTO.for_client(b.data_endpoint)


def test_plain_ipc_that_another_user_could_reach_is_refused(shared_tmp):
    shared = shared_tmp / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    endpoint = f"ipc://{shared}/data.ipc"
    for check in (AUTO.for_server, AUTO.for_client):
        with pytest.raises(InsecureTransportError, match=f"refusing plain {endpoint}: no directory"):
            check(endpoint)
    with pytest.raises(InsecureTransportError, match="abstract-namespace"):
        AUTO.for_server("ipc://@tandem-test")
    allowed = SecurityConfig.from_config({"security": {"enabled": "auto", "allow_insecure_public": True}})
    assert allowed.for_server(endpoint) is None
    os.chmod(shared, 0o700)
    assert AUTO.for_server(endpoint) is None

    fresh = f"ipc://{shared_tmp}/new/run/data.ipc"  # missing directories are made private
    assert AUTO.for_client(fresh) is None
    assert mode(shared_tmp / "new") == mode(shared_tmp / "new/run") == 0o700

    ours_in_open = shared_tmp / "open"  # a 0700 directory of ours, but its parent lets anyone rename it
    ours_in_open.mkdir(mode=0o777)
    os.chmod(ours_in_open, 0o777)
    (ours_in_open / "mine").mkdir(mode=0o700)
    with pytest.raises(InsecureTransportError, match="lets another user replace"):
        AUTO.for_server(f"ipc://{ours_in_open}/mine/data.ipc")


@as_root
def test_a_directory_of_another_user_is_refused(shared_tmp):
    theirs = shared_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(InsecureTransportError, match="owner uid 65534"):
        AUTO.for_server(f"ipc://{theirs}/data.ipc")


@as_root
def test_another_user_cannot_connect_to_the_default_sockets(tmp_path, shared_tmp):
    t = load_config("config", [f"run_dir={tmp_path / 'run'}"]).transport
    with DataReceiver.from_config(t):
        path = t.data_endpoint[len("ipc://"):]
        assert connect_as(os.getuid(), path) == "connected"
        assert connect_as(NOBODY, path) == "denied"
    # the same check sees a socket that is reachable: a world-readable directory, a writable socket
    shared = shared_tmp / "open"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    with DataReceiver(f"ipc://{shared}/data.ipc"):
        os.chmod(shared / "data.ipc", 0o777)
        assert connect_as(NOBODY, str(shared / "data.ipc")) == "connected"
    shutil.rmtree(t.ipc_dir, ignore_errors=True)


def test_a_second_learner_cannot_take_over_a_live_ipc_endpoint(tmp_path):
    endpoint = f"ipc://{tmp_path}/data.ipc"
    with DataReceiver(endpoint):
        with pytest.raises(EndpointInUseError, match="in use by another process"):
            DataReceiver(endpoint)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file left by a killed learner
    stale.bind(str(tmp_path / "stale.ipc"))
    stale.close()
    with DataReceiver(f"ipc://{tmp_path}/stale.ipc") as rx:
        assert rx.endpoint.endswith("stale.ipc")


def test_bind_host_with_ipc_endpoints_is_a_clear_error(tmp_path):
    t = load_config("config", [f"run_dir={tmp_path}", "transport.bind_host=*"]).transport
    with pytest.raises(ValueError, match="bind_host='\\*' applies to tcp endpoints"):
        check_server_security(t)


def test_shared_memory_rings_are_private_and_other_users_rings_are_left_alone():
    spec = spec_from_config(load_config("config", LEARNER_OVERRIDES))
    ring = ShmRingWriter(None, spec.arrays(), num_slots=2, prefix="tandemtestipc_")
    try:
        assert mode(os.path.join(SHM_DIR, ring.name)) == 0o600
    finally:
        ring.close()
    if os.getuid() == 0:
        dead = os.path.join(SHM_DIR, f"tandemtestipc_{2 ** 22 + 7}_dead")  # a pid that is not running
        Path(dead).write_bytes(b"")
        os.chown(dead, NOBODY, NOBODY)
        try:
            assert reap_dead_rings("tandemtestipc_") == [] and os.path.exists(dead)
        finally:
            os.unlink(dead)


def test_live_learner_and_actor_train_on_the_default_private_endpoints(tmp_path):
    """Only run_dir is given: both processes derive the same private ipc endpoints from it."""
    overrides = [f"run_dir={tmp_path / 'run'}", *LEARNER_OVERRIDES]
    t = load_config("config", overrides).transport
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    logs = {n: open(tmp_path / f"{n}.log", "wb") for n in ("learner", "actor")}
    learner = subprocess.Popen([sys.executable, "-m", "learner.main", *overrides], cwd=ROOT, env=env,
                               stdout=logs["learner"], stderr=subprocess.STDOUT)
    actor = subprocess.Popen([sys.executable, "-m", "tools.synthetic", "--actor", "0", "--rate", "20", *overrides],
                             cwd=ROOT, env=env, stdout=logs["actor"], stderr=subprocess.STDOUT)
    try:
        def trained_and_followed():
            r = learner_status(t.control_endpoint)
            if r is None or r.meta["updates"] < 2:
                return None
            versions = [a.get("policy_version", -1) for a in r.meta["actors"].values()]
            return r if versions and max(versions) >= 1 else None  # the actor applied a published version

        status = poll_until(trained_and_followed, 90)
        assert status is not None, (tmp_path / "learner.log").read_text()[-3000:] + (tmp_path / "actor.log").read_text()
        assert "synthetic-0" in status.meta["actors"]
        assert mode(t.ipc_dir) == 0o700
        assert {p.name for p in Path(t.ipc_dir).iterdir()} == {"data.ipc", "weights.ipc", "control.ipc"}
        assert f"data {t.data_endpoint}" in (tmp_path / "learner.log").read_text()  # the learner says where
    finally:
        stop(actor)
        stop(learner)
        for f in logs.values():
            f.close()
        shutil.rmtree(t.ipc_dir, ignore_errors=True)
