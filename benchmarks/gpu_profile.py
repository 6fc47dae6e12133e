"""The ``profile`` phase of bench_gpu.py (issue #20): where one env process's time goes under load.

Env worker sections (``common.laps``, per env step, summed over every worker of the window):
  physics      ManiSkill's _step_action: controller + sim_freq/control_freq PhysX substeps
  evaluate     get_info: success and grasp (contact queries)
  reward       get_reward
  render       the render pass as the CPU submits it (scene poses to the renderer, take_picture)
  render_wait  waiting for the picture: on a GPU renderer its render time, time-sliced with the
               other processes' passes; on a CPU renderer (lavapipe) the whole render
  readback     image to host numpy (the GPU->CPU copy on a GPU renderer)
  state        proprioception and the privileged labels to numpy, the info dict
  reset        a new episode (ManiSkill's reset, with its own render)
  bookkeeping  the worker's segment buffer (slot results copied in)
  ipc_send     observation into the shared-memory slot + the pipe signal
  wait_server  blocked until the server answers (queueing + the batch's inference)
  segment_send pickling a finished segment onto the pipe
  other        the rest of each worker's wall time (Python glue, descheduled time)
Server sections (share of the window): wait (no request pending), gather (batch_wait_ms),
prep (tokens, host->device), sample (policy.sample; synchronised when profiling on CUDA),
writeback (device->host into the slots), value (truncation bootstrap), answer (pipe signals).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.laps import WORKER_SECTIONS, minus

SERVER_SECTIONS = ("wait", "gather", "prep", "sample", "writeback", "value", "answer")


def window_profile(w0: tuple, w1: tuple, s0, s1, sizes: np.ndarray, num_envs: int, seconds: float) -> dict:
    """The profile of a window between two ``InferenceServer.worker_totals()`` and two ``ServerStats``
    snapshots (``sizes``: the window's sample batch sizes)."""
    steps = max(w1[0] - w0[0], 1)
    w = minus(w1[1], w0[1])
    ms = {k: 1000 * w[k][0] / steps for k in WORKER_SECTIONS if k in w}
    wall = 1000 * num_envs * seconds / steps  # each worker's wall time per env step
    ms["other"] = wall - sum(ms.values())
    srv = minus(s1.laps, s0.laps)
    by_size = minus(s1.infer_by_size, s0.infer_by_size)
    return dict(env_steps=steps, wall_ms_per_step=wall, ms_per_step=ms,
                calls_per_step={k: w[k][1] / steps for k in WORKER_SECTIONS if k in w},
                server_share={k: srv[k][0] / seconds for k in SERVER_SECTIONS if k in srv},
                infer_ms_by_size={str(b): 1000 * s / c for b, (s, c) in sorted(by_size.items()) if c and b},
                batches_by_size={str(b): c for b, (s, c) in sorted(by_size.items()) if c and b},
                batch_hist={str(b): int(c) for b, c in enumerate(np.bincount(sizes)) if c and b})


def _label(r: dict) -> str:
    return f"{r.get('variant', 'default')}, {r['envs']}"


def profile_table(rows: list[dict]) -> list[str]:
    """Markdown: ms per env step of every section, then the server's side."""
    rows = [r for r in rows if "profile" in r]
    secs = [k for k in (*WORKER_SECTIONS, "other") if any(k in r["profile"]["ms_per_step"] for r in rows)]
    lines = ["Per env step, ms (each worker's wall time per step split into its sections):", "",
             "| variant, env processes | env-steps/s | wall | " + " | ".join(secs) + " | render passes per step |",
             "|---" * (len(secs) + 4) + "|"]
    for r in rows:
        p = r["profile"]
        cells = " | ".join(f"{p['ms_per_step'].get(k, 0.0):.2f}" for k in secs)
        lines.append(f"| {_label(r)} | {r['env_steps_per_s']:.0f} | {p['wall_ms_per_step']:.2f} | {cells} "
                     f"| {p['calls_per_step'].get('render', 0.0):.2f} |")
    lines += ["", "Server: share of the window per section; sample batches by size (count) and ms per batch:", "",
              "| variant, env processes | " + " | ".join(SERVER_SECTIONS) + " | batch size: count | batch size: ms |",
              "|---" * (len(SERVER_SECTIONS) + 3) + "|"]
    for r in rows:
        p = r["profile"]
        share = " | ".join(f"{p['server_share'].get(k, 0.0):.2f}" for k in SERVER_SECTIONS)
        hist = ", ".join(f"{b}: {c}" for b, c in p["batch_hist"].items())
        ms = ", ".join(f"{b}: {v:.1f}" for b, v in p["infer_ms_by_size"].items())
        lines.append(f"| {_label(r)} | {share} | {hist} | {ms} |")
    return lines + [""]


def plot_profile(rows: list[dict], path: Path):
    """Stacked bars: ms per env step of each section, one bar per (variant, env processes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "profile" in r]
    if not rows:
        return
    secs = [*WORKER_SECTIONS, "other"]
    height = 0.5 * len(rows) + 2.0
    fig, ax = plt.subplots(figsize=(10, height))
    left = np.zeros(len(rows))
    for j, k in enumerate(secs):
        v = np.array([max(r["profile"]["ms_per_step"].get(k, 0.0), 0.0) for r in rows])
        if v.any():
            ax.barh(range(len(rows)), v, left=left, color=plt.cm.tab20(j % 20), label=k)
            left += v
    ax.set_yticks(range(len(rows)), [f"{_label(r)} ({r['env_steps_per_s']:.0f}/s)" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per env step, per env worker")
    fig.legend(fontsize=7, ncol=7, loc="lower center")
    fig.tight_layout(rect=(0, 0.5 / height, 1, 1))
    fig.savefig(path, dpi=110)
