"""Policies against one baseline on the same deterministic episodes: a table and a plot from tandem-eval files.

Each ``tandem-eval --out FILE`` result holds one outcome per (env, seed). Every arm is compared with the
baseline episode by episode (``tools.experiment.paired_change``: the mean change with a bootstrap 95 %
interval over seeds, and how many episodes it newly solves / newly fails), on the seeds both evaluated.

  python -m benchmarks.paired_evals --base "Stage I=eval_stage1.json" \\
      --arm "oracle=eval_A.json" --arm "self=eval_self.json" --out docs/stage2/offline_fbc
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.evaluation import summarize
from tools.experiment import paired_change


def named_file(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def compare(base: tuple[str, dict], arms: list[tuple[str, dict]]) -> dict:
    """{env: {arm: {success, ci95, episodes, change, change_ci95, gained, lost}}} on the shared seeds."""
    evals = {name: result for name, result in [base, *arms]}
    out: dict = {}
    for env in sorted({e["env"] for e in base[1]["episodes"]}):
        seed_sets = [{e["seed"] for e in r["episodes"] if e["env"] == env} for r in evals.values()]
        seeds = sorted(set.intersection(*seed_sets))
        if not seeds:
            raise ValueError(f"no {env} seed was evaluated by every policy")
        out[env] = {}
        for name, result in evals.items():
            eps = [e for e in result["episodes"] if e["env"] == env and e["seed"] in set(seeds)]
            row = dict(summarize(eps)[env])
            if name != base[0]:
                p = paired_change(evals, base[0], [name], env, seeds)
                row.update(change=p["change"], change_ci95=p["ci95"], gained=p["gained"][0], lost=p["lost"][0])
            out[env][name] = row
    return out


def table(results: dict, base_name: str) -> str:
    lines = ["| env | policy | success (95 % CI) | paired change vs " + base_name + " (95 % CI) | newly solved / failed |",
             "|---|---|---|---|---|"]
    for env, rows in results.items():
        for name, r in rows.items():
            lo, hi = r["ci95"]
            change = (f"{100 * r['change']:+.1f} ({100 * r['change_ci95'][0]:+.0f} to {100 * r['change_ci95'][1]:+.0f})"
                      if "change" in r else "")
            flips = f"{r['gained']} / {r['lost']}" if "change" in r else ""
            lines.append(f"| {env} | {name} | {r['success']:.2f} ({lo:.2f}-{hi:.2f}), n={r['episodes']} | {change} | {flips} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = list(results)
    names = list(next(iter(results.values())))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names) * len(envs), 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(envs))]
        ys = [results[env][name]["success"] for env in envs]
        err = [[max(0.0, y - results[env][name]["ci95"][0]) for env, y in zip(envs, ys)],  # float round-off at 0 / 1
               [max(0.0, results[env][name]["ci95"][1] - y) for env, y in zip(envs, ys)]]
        ax.bar(xs, ys, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(envs))], envs)
    ax.set_ylabel("deterministic success (95 % Wilson CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=named_file, required=True, help="NAME=FILE: the baseline's tandem-eval result")
    ap.add_argument("--arm", type=named_file, action="append", required=True, help="NAME=FILE (repeatable)")
    ap.add_argument("--out", required=True, help="folder for paired_evals.md / .json / .png")
    args = ap.parse_args(argv)
    load = lambda nf: (nf[0], json.loads(Path(nf[1]).read_text()))  # noqa: E731
    results = compare(load(args.base), [load(a) for a in args.arm])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(results, args.base[0])
    (out / "paired_evals.md").write_text(text + "\n")
    (out / "paired_evals.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "paired_evals.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
