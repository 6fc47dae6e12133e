"""`tandem-keys`: CURVE keypairs for the learner and its peers (``python -m tools.keys``).

    tandem-keys --dir keys --clients actors collector deployer

writes (zmq.auth.create_certificates format)::

    keys/learner/server.key              learner public key: give it to every peer
    keys/learner/server.key_secret       learner secret key: stays on the learner host
    keys/peers/<client>.key_secret       one per peer role or host: copy it to that peer only
    keys/peers/<client>.key
    keys/authorized_clients/<client>.key the learner admits exactly the public keys found here

and prints the paths. Then ``transport.security.keys_dir=keys`` on the learner and
``transport.security.keys_dir=keys transport.security.client_name=<client>`` on a peer (or the
single key paths). Revoke a peer by deleting its authorized_clients/<client>.key and restarting
the learner. Existing keys are kept unless ``--force``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from pathlib import Path

import zmq.auth

from common.security import (AUTHORIZED_SUBDIR, DEFAULT_CLIENT_NAME, LEARNER_SUBDIR, PEERS_SUBDIR,
                             SERVER_NAME)

CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SECRET_MODE = 0o600
DIR_MODE = 0o700


def _new_pair(directory: Path, name: str, force: bool) -> tuple[Path, Path, bool]:
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    made = force or not secret.exists()
    if made:
        public, secret = map(Path, zmq.auth.create_certificates(str(directory), name))
        os.chmod(secret, SECRET_MODE)
    return public, secret, made


def make_keys(directory: str | os.PathLike, clients: list[str], force: bool = False) -> dict[str, Path]:
    """Write the server pair and one pair per client; returns name -> path of every file."""
    root = Path(directory)
    for name in clients:
        if not CLIENT_NAME.match(name) or name == SERVER_NAME:
            raise ValueError(f"client name {name!r}: letters, digits, '_', '.', '-' (not {SERVER_NAME!r})")
    dirs = {sub: root / sub for sub in (LEARNER_SUBDIR, PEERS_SUBDIR, AUTHORIZED_SUBDIR)}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, DIR_MODE)
    out: dict[str, Path] = {}
    out["server_public_key"], out["server_secret_key"], _ = _new_pair(dirs[LEARNER_SUBDIR], SERVER_NAME, force)
    out["authorized_clients_dir"] = dirs[AUTHORIZED_SUBDIR]
    for name in clients:
        public, secret, _ = _new_pair(dirs[PEERS_SUBDIR], name, force)
        shutil.copyfile(public, dirs[AUTHORIZED_SUBDIR] / public.name)
        out[f"client:{name}"] = secret
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tandem-keys", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="keys", help="where to write the keys (default: ./keys)")
    ap.add_argument("--clients", nargs="+", default=[DEFAULT_CLIENT_NAME],
                    help=f"one keypair per peer name (default: {DEFAULT_CLIENT_NAME})")
    ap.add_argument("--force", action="store_true", help="replace existing keypairs")
    args = ap.parse_args(argv)
    try:
        paths = make_keys(args.dir, args.clients, force=args.force)
    except ValueError as e:
        print(f"tandem-keys: {e}", file=sys.stderr)
        return 2
    print(f"learner secret key (keep on the learner host): {paths['server_secret_key']}")
    print(f"learner public key (give to every peer):       {paths['server_public_key']}")
    print(f"authorised clients directory (learner):        {paths['authorized_clients_dir']}")
    for name in args.clients:
        print(f"peer {name!r} secret key (copy to that peer):  {paths[f'client:{name}']}")
    print(f"\nlearner: transport.security.keys_dir={args.dir}\n"
          f"peer:    transport.security.keys_dir={args.dir} transport.security.client_name=<name>")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
