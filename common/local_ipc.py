"""Private ipc endpoints: the single-host default (issue #18).

By default every endpoint is an ipc (Unix domain) socket in ``transport.ipc_dir``, which the
``tandem_ipc_dir`` resolver makes ``<tmp>/tandem-<uid>/<run_dir's name>-<hash of run_dir>``:
one directory per user and per run (two runs on one host never share a socket), both levels
created with mode 0700. Connecting to a Unix socket needs search permission on every directory
of its path, so another local user can neither connect (get weights, push data, ask status) nor
bind a fake learner there; the same user and root can.

A plain (non-CURVE) ipc endpoint is accepted only in a *private* directory: some directory on its
path belongs to this user with no permission for group or others, and no directory above that
one can be replaced by another user (owned by root or this user, not writable by group or
others unless sticky, like /tmp). ``exposure`` says why a given endpoint is not private.
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

RESOLVER = "tandem_ipc_dir"
PRIVATE_MODE = 0o700
# sizeof(sockaddr_un.sun_path) - 1 on Linux: libzmq refuses longer ipc paths
MAX_IPC_PATH = 107
_RUN_NAME_CHARS = 24


class EndpointInUseError(RuntimeError):
    """A live process already listens on an ipc endpoint (libzmq would silently take it over)."""


def default_ipc_dir(run_dir: str) -> str:
    """The socket directory of the run whose ``run_dir`` is given (not created here)."""
    run = os.path.realpath(os.path.expanduser(str(run_dir)))
    digest = hashlib.sha256(run.encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(run))[:_RUN_NAME_CHARS] or "run"
    return str(Path(tempfile.gettempdir()) / f"tandem-{os.getuid()}" / f"{name}-{digest}")


def register_resolver() -> None:
    """``${tandem_ipc_dir:${run_dir}}`` in configs/transport/default.yaml."""
    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, default_ipc_dir)


def ipc_path(endpoint: str) -> str | None:
    """The socket path of an ``ipc://`` endpoint (``@name``: Linux abstract namespace), else None."""
    scheme, sep, rest = endpoint.partition("://")
    return rest if sep and scheme == "ipc" else None


def make_private_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents with mode 0700 (existing ones are left alone)."""
    missing = []
    for d in (directory, *directory.parents):
        if d.exists():
            break
        missing.append(d)
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_MODE)
        except FileExistsError:  # another process of the run made it first
            pass


def _replaceable(st: os.stat_result) -> bool:
    """Whether another user could rename or replace entries of a directory with this stat."""
    if st.st_uid not in (0, os.getuid()):
        return True
    return bool(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)) and not st.st_mode & stat.S_ISVTX


def private_dir_problem(directory: Path) -> str | None:
    """None when only this user (and root) can reach entries of ``directory``, else why not."""
    chain = [Path(os.path.abspath(directory)), *Path(os.path.abspath(directory)).parents]
    uid = os.getuid()
    for i, d in enumerate(chain):
        st = os.stat(d)
        if st.st_uid == uid and not st.st_mode & 0o077:
            for above in chain[i + 1:]:
                st = os.stat(above)
                if _replaceable(st):
                    return f"{above} (owner uid {st.st_uid}, mode {oct(st.st_mode & 0o7777)}) lets another user replace {d}"
            return None
    st = os.stat(chain[0])
    return (f"no directory of its path is private to this user (uid {uid}): {chain[0]} has owner uid "
            f"{st.st_uid}, mode {oct(st.st_mode & 0o7777)}")


def exposure(endpoint: str) -> str | None:
    """For an ipc endpoint: create its directory (0700) if missing, then None when only this user
    can reach the socket, else why another local user could. None for any other scheme."""
    path = ipc_path(endpoint)
    if path is None:
        return None
    if path.startswith("@"):
        return "an abstract-namespace socket has no file permissions: any local user can connect"
    if len(os.path.abspath(path)) > MAX_IPC_PATH:
        raise ValueError(f"ipc path {path} is longer than {MAX_IPC_PATH} characters (the Unix socket limit): "
                         "set transport.ipc_dir (or the endpoint) to a shorter directory")
    directory = Path(os.path.abspath(path)).parent
    make_private_dirs(directory)
    return private_dir_problem(directory)


def check_unbound(endpoint: str) -> None:
    """Raise EndpointInUseError when a live process listens on this ipc endpoint. (libzmq binds an
    ipc path by unlinking whatever is there: a second learner would silently take the first's
    peers.) A socket file left by a dead process is fine: binding replaces it."""
    path = ipc_path(endpoint)
    if path is None or path.startswith("@") or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except OSError:  # refused: nobody listens (a stale file), or not ours to test: the bind decides
        return
    finally:
        probe.close()
    raise EndpointInUseError(f"{endpoint} is in use by another process (a learner of the same run_dir?): stop it, "
                             "or give this run its own run_dir or transport.ipc_dir")
