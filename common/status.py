"""`tandem-status`: ask the learner's control channel how the run is doing."""
from __future__ import annotations

import json
import sys

from omegaconf import DictConfig

from common.channels import ControlClient
from common.config import run_with_config
from common.protocol import Message


def status(cfg: DictConfig) -> int:
    client = ControlClient.from_config(cfg.transport, identity="tandem-status")
    try:
        reply = client.request(Message(kind="status_request", sender="tandem-status"))
    finally:
        client.close()
    if reply is None:
        print(f"no answer from the learner at {cfg.transport.control_endpoint}", file=sys.stderr)
        return 1
    s = reply.meta
    print(f"learner  version {reply.policy_version}  updates {s.get('updates')}  "
          f"samples/s {s.get('samples_per_s', 0):.1f}  queue {s.get('queue_depth')}  "
          f"real replay {s.get('real_episodes')} episodes / {s.get('real_frames')} frames")
    print(f"policy lag  mean {s.get('lag_mean', 0):.2f}  max {s.get('lag_max', 0)}   dropped {s.get('dropped')}")
    actors = s.get("actors", {})
    print(f"actors connected: {len(actors)}")
    for name, a in sorted(actors.items()):
        print(f"  {name:18s} mode {a.get('mode', '?'):5s} env-steps/s {a.get('env_steps_per_s', 0):7.1f}  "
              f"episodes {a.get('episodes', 0):5d}  success {a.get('success_rate', -1):.2f}  "
              f"version {a.get('policy_version')}  last seen {a.get('age_s', 0):.1f}s ago")
    if "--json" in sys.argv:
        print(json.dumps(s, indent=2, default=str))
    return 0


def main(argv=None) -> int:
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--json"]
    return run_with_config(status, argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
