"""Training report from TensorBoard logs (``tandem-report``): a markdown summary and PNG plots.

  python -m tools.report RUN_DIR [RUN_DIR ...] [--out DIR]

A run directory is a ``run_dir`` of tandem-learner or tandem-sft: TensorBoard event files under
``tb/`` (or directly in it), optionally ``summary.json`` (learner) or ``sft_summary.json`` (SFT),
whose ``eval_history`` stands in for the eval curves when the event files lack them. Several runs
are overlaid in each figure, labelled by run directory name, so that e.g. co-training against plain
PPO is one look. Tags a run lacks are skipped. Writes ``report.md`` and ``*.png`` into ``--out``
(default: ``RUN_DIR/report`` for one run, ``./report`` for several).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

EVENT_GLOB = "events.out.tfevents.*"
SUMMARY_FILES = ("summary.json", "sft_summary.json")
EVAL_TAG = {"sim": "eval/sim_success", "real_proxy": "eval/real_proxy_success"}  # eval_history env -> tag
PLOT_DPI = 100
PANEL_SIZE = (5.0, 3.5)  # inches per subplot


@dataclass(frozen=True)
class Metric:
    tag: str
    label: str
    better: Optional[str]  # "max" | "min" | None (no "best")


METRICS = [
    Metric("eval/sim_success", "twin success", "max"),
    Metric("eval/real_proxy_success", "real-proxy success", "max"),
    Metric("train/ppo_loss", "PPO loss", "min"),
    Metric("train/sft_loss", "SFT loss", "min"),
    Metric("actor/total_loss", "total loss", "min"),
    Metric("train/loss_ratio", "loss ratio beta|L_SFT|/|L_RL|", None),
    Metric("policy_lag/mean", "policy lag (mean)", "min"),
    Metric("policy_lag/max", "policy lag (max)", "min"),
    Metric("throughput/sim_samples_per_s", "sim samples/s", "max"),
    Metric("sft/loss", "Stage I SFT loss", "min"),
    Metric("train/approx_kl", "approx. KL to the behaviour policy", None),
    Metric("train/approx_kl_last", "approx. KL when the update ended", None),
    Metric("train/clip_fraction", "PPO clip fraction", None),
    Metric("train/explained_variance", "value explained variance", "max"),
    Metric("rollout/success_rate_in_batch", "success in trained batches (stochastic)", "max"),
    Metric("train/rl_loss", "RL term (PPO loss, or filtered BC's flow matching)", "min"),
    Metric("replay/success_episodes", "filtered BC: successful episodes in the replay", "max"),
    Metric("replay/assembled_episodes", "filtered BC: episodes joined from segments", "max"),
]
LABEL = {m.tag: m.label for m in METRICS}


@dataclass(frozen=True)
class Panel:
    title: str
    tags: tuple  # drawn in this panel: one line per (run, tag)
    log_y: bool = False  # only applied when every value is positive
    ylim: Optional[tuple] = None
    markers: bool = False  # sparse series (evaluations)


@dataclass(frozen=True)
class Figure:
    file: str
    title: str
    panels: tuple
    xlabel: str = "update"


SUCCESS_YLIM = (-0.05, 1.05)
FIGURES = [
    Figure("success.png", "Evaluation success (deterministic episodes)",
           (Panel("twin", ("eval/sim_success",), ylim=SUCCESS_YLIM, markers=True),
            Panel("real proxy", ("eval/real_proxy_success",), ylim=SUCCESS_YLIM, markers=True))),
    Figure("losses.png", "Co-training losses",
           (Panel("train/ppo_loss", ("train/ppo_loss",)), Panel("train/sft_loss", ("train/sft_loss",)),
            Panel("actor/total_loss", ("actor/total_loss",)), Panel("train/loss_ratio", ("train/loss_ratio",), log_y=True))),
    # PPO's health: an update should move the policy by approx. KL ~0.01-0.02 with a clip fraction ~0.1
    Figure("ppo_health.png", "PPO step size and critic",
           (Panel("approx. KL (solid: applied steps, dashed: at the end)", ("train/approx_kl", "train/approx_kl_last"), log_y=True), Panel("clip fraction", ("train/clip_fraction",)),
            Panel("value explained variance", ("train/explained_variance",)),
            Panel("success in trained batches", ("rollout/success_rate_in_batch",), ylim=SUCCESS_YLIM))),
    Figure("filtered_bc.png", "Filtered BC: success replay",
           (Panel("episodes (solid: kept successes, dashed: joined)",
                  ("replay/success_episodes", "replay/assembled_episodes")),)),
    Figure("policy_lag.png", "Policy lag (versions; solid mean, dashed max)",
           (Panel("policy lag", ("policy_lag/mean", "policy_lag/max")),)),
    Figure("throughput.png", "Learner throughput", (Panel("sim samples/s", ("throughput/sim_samples_per_s",)),)),
    Figure("sft_loss.png", "Stage I SFT loss", (Panel("sft/loss", ("sft/loss",)),), xlabel="SFT step"),
]
LINE_STYLES = ("-", "--", ":", "-.")


@dataclass
class Series:
    steps: np.ndarray
    values: np.ndarray

    @property
    def final(self) -> float:
        return float(self.values[-1])

    def best(self, better: Optional[str]) -> Optional[float]:
        if better == "max":
            return float(self.values.max())
        if better == "min":
            return float(self.values.min())
        return None


@dataclass
class Run:
    name: str
    path: Path
    scalars: dict = field(default_factory=dict)  # tag -> Series
    summary: dict = field(default_factory=dict)  # summary.json / sft_summary.json, merged


# ----- reading -----------------------------------------------------------------------------------
def event_file_order(path: Path) -> tuple:
    """Event files by creation: their names are events.out.tfevents.<unix time>.<host>.<pid>.<n>."""
    stamp = path.name[len(EVENT_GLOB) - 1:].split(".")[0]
    return (int(stamp) if stamp.isdigit() else int(path.stat().st_mtime), path.name)


def read_scalars(run_dir: Path) -> dict:
    """Every scalar tag in the run's event files -> Series sorted by step.

    Files are read oldest first. A file that starts at or before a step already seen is a restart
    (from a checkpoint): the older points from its first step on are dropped, as TensorBoard does,
    so the curve is the history of the weights that were kept."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    root = run_dir / "tb" if (run_dir / "tb").is_dir() else run_dir
    per_writer: dict[tuple, dict[int, float]] = {}  # (directory, tag) -> step -> value
    for path in sorted(root.rglob(EVENT_GLOB), key=event_file_order):
        acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})  # 0: keep every point
        acc.Reload()
        for tag in acc.Tags()[SCALARS]:
            events = acc.Scalars(tag)
            if not events:
                continue
            key = (path.parent, tag)  # restarts are detected per writer directory
            restart = min(e.step for e in events)
            by_step = {s: v for s, v in per_writer.get(key, {}).items() if s < restart}
            for e in events:  # in write order: the last write of a step wins
                by_step[e.step] = e.value
            per_writer[key] = by_step
    merged: dict[str, dict[int, float]] = {}  # tag -> step -> value
    for (_, tag), by_step in sorted(per_writer.items(), key=lambda kv: str(kv[0][0])):
        merged.setdefault(tag, {}).update(by_step)
    out = {}
    for tag, by_step in merged.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = Series(steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def read_summary(run_dir: Path) -> dict:
    summary = {}
    for name in SUMMARY_FILES:
        path = run_dir / name
        if path.is_file():
            try:
                summary.update(json.loads(path.read_text()))
            except json.JSONDecodeError as e:  # e.g. being rewritten right now
                print(f"warning: {path}: {e}", file=sys.stderr)
    return summary


def eval_series_from_history(history: list) -> dict:
    """``eval_history`` entries {env, success, update} -> {eval tag: Series}."""
    out = {}
    for env, tag in EVAL_TAG.items():
        entries = sorted((int(e.get("update", 0)), float(e["success"])) for e in history if e.get("env") == env)
        if entries:
            steps, values = zip(*entries)
            out[tag] = Series(np.array(steps, np.int64), np.array(values, np.float64))
    return out


def read_run(run_dir: Path, name: str) -> Run:
    run = Run(name, run_dir, read_scalars(run_dir), read_summary(run_dir))
    for tag, series in eval_series_from_history(run.summary.get("eval_history") or []).items():
        run.scalars.setdefault(tag, series)  # TensorBoard first; the summary fills what it lacks
    return run


def run_names(paths: list) -> list[str]:
    """Directory names, made unique with their parent's name where two runs share one."""
    names = [p.name or str(p) for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


# ----- writing -----------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def run_table(run: Run) -> list[str]:
    lines = ["| metric | tag | final | best | min | max | points | last step |",
             "|---|---|---|---|---|---|---|---|"]
    for m in METRICS:
        s = run.scalars.get(m.tag)
        if s is None or len(s.values) == 0:
            continue
        lines.append(f"| {m.label} | `{m.tag}` | {fmt(s.final)} | {fmt(s.best(m.better))} | "
                     f"{fmt(float(s.values.min()))} | {fmt(float(s.values.max()))} | {len(s.values)} | {int(s.steps[-1])} |")
    return lines if len(lines) > 2 else ["(none of the report's tags were logged)"]


SUMMARY_KEYS = ("updates", "steps", "policy_version", "co_training", "duration_s", "sim_samples",
                "real_samples", "initial_loss", "final_loss")


def comparison_table(runs: list[Run]) -> list[str]:
    lines = ["| run | twin success final / best | real-proxy success final / best | co-training | updates |",
             "|---|---|---|---|---|"]
    for run in runs:
        cells = []
        for tag in EVAL_TAG.values():
            s = run.scalars.get(tag)
            cells.append(f"{fmt(s.final)} / {fmt(s.best('max'))}" if s is not None else "-")
        updates = run.summary.get("updates", run.summary.get("steps"))
        lines.append(f"| {run.name} | {cells[0]} | {cells[1]} | {fmt(run.summary.get('co_training'))} | {fmt(updates)} |")
    return lines


def plot_figure(figure: Figure, runs: list[Run], out_dir: Path) -> Optional[Path]:
    """One PNG with a panel per entry of ``figure.panels``, every run overlaid; None if no run has data."""
    if not any(tag in run.scalars for run in runs for panel in figure.panels for tag in panel.tags):
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(figure.panels)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, panel in zip(axes.flat, figure.panels):
        drawn = False
        for i, run in enumerate(runs):
            for j, tag in enumerate(panel.tags):
                s = run.scalars.get(tag)
                if s is None:
                    continue
                label = run.name if len(panel.tags) == 1 else f"{run.name} {tag.split('/')[-1]}"
                marker = "o" if panel.markers or len(s.values) < 2 else None  # a lone point needs a marker
                ax.plot(s.steps, s.values, LINE_STYLES[j % len(LINE_STYLES)], color=colors[i % len(colors)],
                        marker=marker, label=label)
                drawn = True
        ax.set_title(panel.title)
        ax.set_xlabel(figure.xlabel)
        ax.grid(True, alpha=0.3)
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        if drawn:
            ax.legend(fontsize="small")
            if panel.log_y and all((run.scalars[t].values > 0).all()
                                   for run in runs for t in panel.tags if t in run.scalars):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(figure.title)
    fig.tight_layout()
    path = out_dir / figure.file
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)
    return path


def write_report(runs: list[Run], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Tandem training report", "", "Runs: " + ", ".join(f"`{r.name}` ({r.path})" for r in runs), "",
             "## Comparison", "", *comparison_table(runs), ""]
    for run in runs:
        lines += [f"## {run.name}", "", f"Directory: `{run.path}`", ""]
        facts = [f"{k}: {fmt(run.summary[k])}" for k in SUMMARY_KEYS if run.summary.get(k) is not None]
        if facts:
            lines += ["Summary: " + "; ".join(facts), ""]
        if not run.scalars:
            lines += ["No TensorBoard scalars found.", ""]
        lines += [*run_table(run), ""]
    lines += ["## Plots", ""]
    for figure in FIGURES:
        path = plot_figure(figure, runs, out_dir)
        if path is not None:
            lines += [f"### {figure.title}", "", f"![{figure.title}]({path.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tandem-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (tandem-learner or tandem-sft run_dir)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: RUN_DIR/report for one run, ./report for several)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.runs if not p.is_dir()]
    if missing:
        print(f"not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    paths = [p.resolve() for p in args.runs]
    runs = [read_run(p, name) for p, name in zip(paths, run_names(paths))]
    out = args.out or (paths[0] / "report" if len(paths) == 1 else Path("report"))
    report = write_report(runs, out)
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
