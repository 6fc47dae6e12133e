"""CURVE authentication and encryption of Tandem's ZeroMQ sockets.

The learner binds every socket, so every learner socket is a CURVE *server* (it holds the server
secret key) and every peer socket (actor, collector, deployer, tandem-status) a CURVE *client*
(its own keypair plus the server's public key). A ZAP handler in the learner's process
(``zmq.auth.thread.ThreadAuthenticator``) admits only clients whose public key is in the
authorised-clients directory: a peer without one completes no handshake, so it can neither push
data, nor receive weights, nor query status; its connection attempts never reach the receivers.

``transport.security.enabled``:
    false  plain sockets (NULL mechanism)
    true   CURVE on every socket, loopback and ipc included (keys required)
    auto   CURVE where a socket binds or connects a non-loopback TCP address; plain on ipc and
           loopback. The one-host default (ipc in a 0700 directory, common/local_ipc.py) therefore
           needs no keys. A plain ipc endpoint that another local user could reach is refused like
           a public bind without keys; plain loopback TCP is accepted with a warning (every local
           user can connect to it).

A learner whose ``auto`` resolves to CURVE but which has no keys refuses to start
(``InsecureTransportError``) unless ``allow_insecure_public: true`` says so explicitly.

Key files are ZeroMQ certificates (``zmq.auth.create_certificates``): ``<name>.key`` holds the
public key, ``<name>.key_secret`` both keys. ``tandem-keys`` (tools/keys.py) writes them.
"""
from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common import local_ipc
from common.protocol import cfg_get

log = logging.getLogger(__name__)

ENABLED_VALUES = ("auto", "true", "false")
# Layout written by tandem-keys under keys_dir (each path can also be set on its own).
SERVER_NAME = "server"
LEARNER_SUBDIR = "learner"          # server.key (public, give to peers) + server.key_secret
AUTHORIZED_SUBDIR = "authorized_clients"  # <client>.key public keys the learner admits
PEERS_SUBDIR = "peers"              # <client>.key + <client>.key_secret, one pair per peer
DEFAULT_CLIENT_NAME = "peer"
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
_warned_loopback: set[str] = set()  # each plain loopback bind is warned about once per process


class InsecureTransportError(RuntimeError):
    """A socket would be reachable from other hosts without CURVE, and nobody allowed that."""


class SecurityConfigError(ValueError):
    """CURVE is on but a key file or directory is missing or unreadable."""


def _path(value: Any) -> Path | None:
    return Path(os.path.expanduser(str(value))) if value not in (None, "", "null") else None


def _enabled(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower() if value is not None else "auto"
    if text not in ENABLED_VALUES:
        raise SecurityConfigError(f"transport.security.enabled must be one of {ENABLED_VALUES}, not {value!r}")
    return text


def endpoint_is_local(endpoint: str) -> bool:
    """Whether only this host can reach ``endpoint``: ipc/inproc, or TCP on a loopback address.
    A wildcard ("*", 0.0.0.0, ::) or a host name other than localhost counts as public."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if ";" in host:  # "source;destination" connect syntax: the destination decides
        host = host.split(";", 1)[1]
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface or a host name


@dataclass(frozen=True)
class SecurityConfig:
    """``transport.security`` of the config, with key paths resolved against ``keys_dir``."""
    enabled: str = "auto"
    server_secret_key: Path | None = None   # learner: its server.key_secret
    server_public_key: Path | None = None   # peers: the learner's server.key
    client_secret_key: Path | None = None   # peers: their own <name>.key_secret
    authorized_clients_dir: Path | None = None  # learner: public keys of admitted peers
    allow_insecure_public: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "SecurityConfig":
        """From a root config, its ``transport`` group, or the ``security`` mapping itself."""
        t = cfg_get(cfg, "transport", cfg)
        s = cfg_get(t, "security", t)
        keys_dir = _path(cfg_get(s, "keys_dir"))
        client = str(cfg_get(s, "client_name", None) or DEFAULT_CLIENT_NAME)

        def key(name: str, default: str) -> Path | None:
            explicit = _path(cfg_get(s, name))
            return explicit or (keys_dir / default if keys_dir is not None else None)

        return cls(
            enabled=_enabled(cfg_get(s, "enabled", "auto")),
            server_secret_key=key("server_secret_key", f"{LEARNER_SUBDIR}/{SERVER_NAME}.key_secret"),
            server_public_key=key("server_public_key", f"{LEARNER_SUBDIR}/{SERVER_NAME}.key"),
            client_secret_key=key("client_secret_key", f"{PEERS_SUBDIR}/{client}.key_secret"),
            authorized_clients_dir=key("authorized_clients_dir", AUTHORIZED_SUBDIR),
            allow_insecure_public=bool(cfg_get(s, "allow_insecure_public", False)),
        )

    def wanted(self, endpoint: str) -> bool:
        """Whether a socket on ``endpoint`` (the address it binds or connects) uses CURVE."""
        if self.enabled == "auto":
            return not endpoint_is_local(endpoint)
        return self.enabled == "true"

    def server_keys_present(self) -> bool:
        return bool(self.server_secret_key and self.server_secret_key.is_file()
                    and self.authorized_clients_dir and self.authorized_clients_dir.is_dir())

    def client_keys_present(self) -> bool:
        return bool(self.client_secret_key and self.client_secret_key.is_file()
                    and self.server_public_key and self.server_public_key.is_file())

    # -- per-socket decisions -------------------------------------------------------------------
    def for_server(self, bind_endpoint: str) -> "ServerSecurity | None":
        """The CURVE server setup for a learner socket binding ``bind_endpoint``, or None (plain).

        Raises InsecureTransportError for a public bind without keys (``auto``) unless
        ``allow_insecure_public``; SecurityConfigError when CURVE is required but keys are missing."""
        if not self.wanted(bind_endpoint):
            self._check_plain_local(bind_endpoint)
            return None
        if not self.server_keys_present():
            if self.enabled == "auto":
                if self.allow_insecure_public:
                    log.warning("binding %s WITHOUT authentication or encryption "
                                "(transport.security.allow_insecure_public=true)", bind_endpoint)
                    return None
                raise InsecureTransportError(
                    f"refusing to bind {bind_endpoint} (reachable from other hosts) without CURVE keys: "
                    "run `tandem-keys --dir <keys>` and set transport.security.keys_dir=<keys>, or bind a "
                    "loopback/ipc endpoint, or set transport.security.allow_insecure_public=true")
            raise SecurityConfigError(
                f"transport.security.enabled=true but the server secret key ({self.server_secret_key}) "
                f"or the authorised clients directory ({self.authorized_clients_dir}) is missing")
        return ServerSecurity.load(self.server_secret_key, self.authorized_clients_dir)

    def _check_plain_local(self, endpoint: str, server: bool = True) -> None:
        """``auto`` on a plain local endpoint: refuse an ipc socket that another local user could reach
        (unless ``allow_insecure_public``); warn on loopback TCP (learner side)."""
        if self.enabled != "auto":
            return
        problem = local_ipc.exposure(endpoint)
        if problem is None:
            if server and endpoint.startswith("tcp://") and endpoint not in _warned_loopback:
                _warned_loopback.add(endpoint)
                log.warning("%s is plain TCP on loopback: every local user of this host can connect (pull "
                            "weights, push data); the default ipc endpoints or CURVE prevent that", endpoint)
            return
        if self.allow_insecure_public:
            log.warning("%s WITHOUT authentication: %s (transport.security.allow_insecure_public=true)", endpoint, problem)
            return
        raise InsecureTransportError(
            f"refusing plain {endpoint}: {problem}. Use the default transport.ipc_dir, a directory of yours with "
            "mode 0700 (chmod 700), or CURVE (transport.security.enabled=true with keys); "
            "transport.security.allow_insecure_public=true accepts it")

    def for_client(self, connect_endpoint: str) -> "ClientSecurity | None":
        """The CURVE client setup for a peer socket connecting ``connect_endpoint``, or None."""
        if not self.wanted(connect_endpoint):
            self._check_plain_local(connect_endpoint, server=False)
            return None
        if not self.client_keys_present():
            if self.enabled == "auto" and self.allow_insecure_public:
                log.warning("connecting %s WITHOUT authentication or encryption", connect_endpoint)
                return None
            raise SecurityConfigError(
                f"CURVE is on for {connect_endpoint} but the client secret key ({self.client_secret_key}) or "
                f"the learner's public key ({self.server_public_key}) is missing: copy them from "
                "`tandem-keys` output and set transport.security.keys_dir (or the key paths)")
        return ClientSecurity.load(self.client_secret_key, self.server_public_key)


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as e:
        raise SecurityConfigError(f"cannot read CURVE key file {path}: {e}") from e
    if secret and not secret_key:
        raise SecurityConfigError(f"{path} holds no secret key (use the .key_secret file)")
    return public, secret_key


# ----------------------------------------------------------------------------------------------
# the ZAP handler: one per (process, authorised-clients directory)

_auth_lock = threading.Lock()
_authenticator: ThreadAuthenticator | None = None
_auth_domains: dict[str, str] = {}  # authorised clients directory -> its ZAP domain


def _zap_domain(authorized_dir: Path) -> str:
    """Start the process's authenticator on first use and give each authorised-clients directory
    its own ZAP domain, so sockets configured from different directories never mix."""
    global _authenticator
    location = str(authorized_dir.resolve())
    with _auth_lock:
        if _authenticator is None:
            _authenticator = ThreadAuthenticator(zmq.Context.instance(), log=logging.getLogger("tandem.zap"))
            _authenticator.start()
            atexit.register(stop_authenticator)
        if location not in _auth_domains:
            domain = f"tandem-{len(_auth_domains)}"
            _authenticator.configure_curve(domain=domain, location=location)
            _auth_domains[location] = domain
        return _auth_domains[location]


def stop_authenticator() -> None:
    """Stop the ZAP thread (tests; atexit). Sockets created afterwards start a new one."""
    global _authenticator
    with _auth_lock:
        if _authenticator is not None:
            _authenticator.stop()
            _authenticator = None
            _auth_domains.clear()


@dataclass(frozen=True)
class ServerSecurity:
    public_key: bytes
    secret_key: bytes
    authorized_clients_dir: Path

    @classmethod
    def load(cls, secret_key_file: Path, authorized_clients_dir: Path) -> "ServerSecurity":
        public, secret = _load(secret_key_file, secret=True)
        if not authorized_clients_dir.is_dir():
            raise SecurityConfigError(f"authorised clients directory {authorized_clients_dir} does not exist")
        if not any(authorized_clients_dir.glob("*.key")):
            log.warning("no public keys in %s: no peer can connect", authorized_clients_dir)
        return cls(public, secret, authorized_clients_dir)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE server checked by the ZAP handler (before bind)."""
        sock.zap_domain = _zap_domain(self.authorized_clients_dir).encode()
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True


@dataclass(frozen=True)
class ClientSecurity:
    public_key: bytes
    secret_key: bytes
    server_public_key: bytes

    @classmethod
    def load(cls, secret_key_file: Path, server_public_key_file: Path) -> "ClientSecurity":
        public, secret = _load(secret_key_file, secret=True)
        server_public, _ = _load(server_public_key_file, secret=False)
        return cls(public, secret, server_public)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a CURVE client of the learner (before connect)."""
        sock.curve_secretkey = self.secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.server_public_key


Security = ServerSecurity | ClientSecurity
