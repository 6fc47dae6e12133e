"""`tandem-status`: ask the learner's control channel how the run is doing."""
from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from common.channels import ControlClient
from common.config import run_with_config
from common.protocol import Message


def _num(value, spec: str) -> str:
    """A number in ``spec``, or '?' for anything else a (possibly hostile) reply holds there."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "?"
    return format(value, spec)


def _text(value, limit: int = 64) -> str:
    return str(value)[:limit]


def status(cfg: DictConfig) -> int:
    client = ControlClient.from_config(cfg.transport, identity="tandem-status")
    try:
        reply = client.request(Message(kind="status_request", sender="tandem-status"))
    finally:
        client.close()
    if reply is None:
        hint = (f" (the default endpoints follow run_dir, here {cfg.run_dir}: pass the learner's run_dir=...)"
                if cfg.transport.control_endpoint.startswith(f"ipc://{cfg.transport.ipc_dir}/") else "")
        print(f"no answer from the learner at {cfg.transport.control_endpoint}{hint}", file=sys.stderr)
        return 1
    s = reply.meta if isinstance(reply.meta, dict) else {}
    print(f"learner  version {_text(reply.policy_version)}  updates {_text(s.get('updates'))}  "
          f"samples/s {_num(s.get('samples_per_s'), '.1f')}  queue {_text(s.get('queue_depth'))}  "
          f"real replay {_text(s.get('real_episodes'))} episodes / {_text(s.get('real_frames'))} frames")
    print(f"policy lag  mean {_num(s.get('lag_mean'), '.2f')}  max {_text(s.get('lag_max'))}   "
          f"dropped {_text(s.get('dropped'), 400)}")
    actors = s.get("actors") if isinstance(s.get("actors"), dict) else {}
    print(f"actors connected: {len(actors)}")
    for name, a in sorted(actors.items(), key=lambda kv: str(kv[0])):
        a = a if isinstance(a, dict) else {}
        print(f"  {_text(name, 18):18s} mode {_text(a.get('mode', '?'), 5):5s} "
              f"env-steps/s {_num(a.get('env_steps_per_s'), '7.1f')}  episodes {_num(a.get('episodes'), '5.0f')}  "
              f"success {_num(a.get('success_rate'), '.2f')}  version {_text(a.get('policy_version'))}  "
              f"last seen {_num(a.get('age_s'), '.1f')}s ago")
    if "--json" in sys.argv:
        print(json.dumps(s, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--json"]
    return run_with_config(status, argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
