"""`tandem-run`: one learner and N actors as separate OS processes on this host.

Each process is started with its own command (``python -m learner.main`` / ``actors.main``) and
the same Hydra overrides, so the launch is exactly what a user would type in N terminals.
Signals are forwarded; Ctrl-C stops them all; the exit code is non-zero if any process failed.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

from omegaconf import DictConfig

from common.config import LEARNER_STOPPED_ON_TRAIN_ERRORS, run_with_config



def _cmd(module: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", module, *overrides]


def launch(cfg: DictConfig, overrides: list[str]) -> int:
    lcfg = cfg.launch
    specs = {"learner": _cmd("learner.main", overrides)}
    for i in range(lcfg.num_actors):
        specs[f"actor-{i}"] = _cmd("actors.main", overrides + [f"actor.id=actor-{i}", f"actor.seed_offset={i}"])
    if lcfg.eval_actors:
        for name, proxy in (("eval-sim", False), ("eval-real-proxy", True)):
            specs[name] = _cmd("actors.main", overrides + [
                f"actor.id={name}", "actor.mode=eval", f"actor.real_proxy={str(proxy).lower()}",
                f"actor.seed_offset={1000 + int(proxy)}"])
    procs = {name: subprocess.Popen(cmd) for name, cmd in specs.items()}
    print(f"[tandem-run] started {', '.join(f'{n} (pid {p.pid})' for n, p in procs.items())}", flush=True)

    stopping = {"sig": None}

    def forward(sig, _frame):
        stopping["sig"] = sig

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)

    failed: list[str] = []
    while True:
        if stopping["sig"] is not None:
            break
        learner_rc = procs["learner"].poll()
        if learner_rc is not None:
            if learner_rc == LEARNER_STOPPED_ON_TRAIN_ERRORS:
                failed.append(f"learner (exit {learner_rc}: stopped cleanly after repeated train-step errors, "
                              "checkpoint saved; see its log)")
            elif learner_rc != 0:
                failed.append(f"learner (exit {learner_rc}: crashed)")
            break
        for name, p in list(procs.items()):
            rc = p.poll()
            if name == "learner" or rc is None or rc == 0:
                continue
            if lcfg.restart_actors:
                print(f"[tandem-run] {name} exited {rc}: restarting", flush=True)
                procs[name] = subprocess.Popen(specs[name])
            else:
                failed.append(f"{name} (exit {rc})")
        if failed:
            break
        time.sleep(0.5)

    for name, p in procs.items():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + lcfg.stop_timeout_s
    for name, p in procs.items():
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if failed:
        print(f"[tandem-run] failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        return 1
    return 0 if stopping["sig"] is None else 130


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    return run_with_config(lambda cfg: launch(cfg, [a for a in args if a != "--cfg"]), argv=args)


if __name__ == "__main__":
    raise SystemExit(main())
