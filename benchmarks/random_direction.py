"""Is a Stage II policy's change better than a random change of the same size? (issue #17)

    python -m benchmarks.random_direction --start checkpoints/stage1_low_data --trained RUN/stage2_cotrain \
        [--directions 2] [--envs real_proxy twin] [--seeds 100000:100100] [--workers 2] [--out DIR]

The null model for "PPO moves the weights in a mostly random direction": for each of ``--directions``
random seeds, a policy whose every tensor is the start's plus a Gaussian direction scaled to the norm
of that tensor's actual change (start -> trained; unchanged tensors stay unchanged, so a frozen
encoder stays frozen). The start, the trained policy and the random ones are evaluated
deterministically on the same held-out seeds (``common.evaluation``); per env the report gives
success and the paired change against the start (episodes newly solved / newly failed). If the
trained policy's change is no better than the random ones', its updates carried no more
information about the task than noise of their size.

Writes ``random_direction.json`` and ``random_direction.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from common.evaluation import ENV_OVERRIDES_FILE, evaluate_parallel, parse_seeds
from common.policy import load_policy


def random_change(start: dict, trained: dict, seed: int) -> tuple[dict, dict]:
    """start + a random direction with the per-tensor norms of ``trained - start``; and those norms."""
    generator = torch.Generator().manual_seed(seed)
    out, norms = {}, {}
    for name, w0 in start.items():
        delta = trained[name].float() - w0.float()
        norm = float(delta.norm())
        if norm == 0.0 or not w0.is_floating_point():
            out[name] = w0.clone()
            continue
        direction = torch.randn(w0.shape, generator=generator)
        out[name] = (w0.float() + direction * (norm / float(direction.norm()))).to(w0.dtype)
        norms[name] = norm
    return out, norms


def paired(start_eps: list[dict], eps: list[dict]) -> tuple[int, int]:
    """(newly solved, newly failed) against the start on the same (env, seed) episodes."""
    before = {(e["env"], e["seed"]): e["success"] for e in start_eps}
    solved = sum(1 for e in eps if e["success"] and not before[(e["env"], e["seed"])])
    failed = sum(1 for e in eps if not e["success"] and before[(e["env"], e["seed"])])
    return solved, failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--start", required=True, help="the policy Stage II started from (Stage I)")
    ap.add_argument("--trained", required=True, help="the Stage II policy")
    ap.add_argument("--directions", type=int, default=2, help="random policies (one seed each)")
    ap.add_argument("--envs", nargs="+", default=["real_proxy", "twin"])
    ap.add_argument("--seeds", nargs="+", default=["100000:100100"], help="episode seeds (tandem-eval's syntax)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="runs/random_direction")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start, trained = load_policy(a.start), load_policy(a.trained)
    work = Path(tempfile.mkdtemp(prefix="random_direction."))
    policies = {"start": a.start, "trained": a.trained}
    changed = {}
    for k in range(a.directions):
        state, norms = random_change(start.state_dict(), trained.state_dict(), seed=k)
        changed = norms
        policy = load_policy(a.start)
        policy.load_state_dict(state)
        path = work / f"random{k}"
        policy.save(str(path))
        shutil.copy(Path(a.trained) / ENV_OVERRIDES_FILE, path / ENV_OVERRIDES_FILE)
        policies[f"random{k}"] = str(path)
    seeds = parse_seeds(a.seeds)
    results = evaluate_parallel([(p, a.envs, seeds) for p in policies.values()], a.workers, a.device)
    rows = []
    for name, path in policies.items():
        for env in a.envs:
            eps = [e for e in results[path]["episodes"] if e["env"] == env]
            start_eps = [e for e in results[a.start]["episodes"] if e["env"] == env]
            solved, failed = paired(start_eps, eps)
            rows.append({"policy": name, "env": env, "success": results[path]["summary"][env]["success"],
                         "episodes": len(eps), "newly_solved": solved, "newly_failed": failed})
    total_change = sum(n ** 2 for n in changed.values()) ** 0.5
    lines = [f"# Stage II change vs random changes of the same size\n",
             f"start `{a.start}`, trained `{a.trained}`; {len(changed)} tensors changed, total norm {total_change:.3f}; "
             f"{len(seeds)} deterministic episodes per env (seeds {a.seeds}).\n",
             "| policy | env | success | newly solved / newly failed vs start |", "|---|---|---|---|"]
    lines += [f"| {r['policy']} | {r['env']} | {r['success']:.2f} | {r['newly_solved']} / {r['newly_failed']} |" for r in rows]
    (out / "random_direction.md").write_text("\n".join(lines) + "\n")
    (out / "random_direction.json").write_text(json.dumps({"args": vars(a), "change_norms": changed, "rows": rows,
                                                           "episodes": {k: results[p]["episodes"] for k, p in policies.items()}},
                                                          indent=1))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
