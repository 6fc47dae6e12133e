#!/usr/bin/env bash
# scripts/device/system_run.sh OUTDIR [SECONDS=150] [key=value ...]   (ON THE GPU MACHINE, via run.sh)
# The real process layout on one GPU: `tandem-run` with a learner and one actor whose
# `actor.num_envs` env processes are served by the batched inference server (CUDA graphs), PPO only
# (no real data, so no lerobot), base VLA, 128x128 RGB. Learner and actor talk over ipc ZeroMQ (the
# default private sockets of run_dir) and the shared-memory ring. Writes OUTDIR/summary.json (the
# learner's) and OUTDIR/system_log.txt.
set -uo pipefail
OUTDIR=${1:?usage: system_run.sh OUTDIR [SECONDS] [overrides]}; shift
SECS=${1:-150}; [ $# -gt 0 ] && shift
RUN=/tmp/tandem_system_run; rm -rf "$RUN"; mkdir -p "$RUN" "$OUTDIR"
python3 -m tools.launch launch.num_actors=1 launch.eval_actors=false device=cuda actor.device=cuda \
  policy=base env.image_size=128 actor.inference=server actor.num_envs=16 actor.server.cuda_graphs=true \
  learner.use_real_data_co_training=false learner.live_dataset.root=null learner.max_duration_s="$SECS" \
  learner.global_batch_size=16 learner.micro_batch_size=16 learner.checkpoint_interval=100000 \
  run_dir="$RUN" "$@" > "$OUTDIR/system_log.txt" 2>&1
rc=$?
cp "$RUN/summary.json" "$OUTDIR/" 2>/dev/null
grep -v "Warning\|learner updates:" "$OUTDIR/system_log.txt" | tail -25
python3 - "$RUN/summary.json" "$RUN/tb" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
try:  # steady state from TensorBoard (the totals include the actor's start-up)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(sys.argv[2]); ea.Reload()
    v = [e.value for e in ea.Scalars("throughput/sim_samples_per_s")]
    v = sorted(v[len(v) // 2:])
    print(f"[system] steady-state learner samples/s (median of the 2nd half of the run): {v[len(v) // 2]:.0f}")
except Exception as e:
    print(f"[system] no TensorBoard throughput: {e!r}")
h = s["policy_lag_histogram"]; n = sum(h) or 1
print(f"[system] updates {s['updates']} in {s['duration_s']} s: {s['sim_samples'] / s['duration_s']:.0f} samples/s "
      f"({8 * s['sim_samples'] / s['duration_s']:.0f} env-steps/s consumed at k=8); lag histogram {h}, "
      f"mean {sum(i * c for i, c in enumerate(h)) / n:.2f}; dropped {s['dropped']}")
PY
exit $rc
