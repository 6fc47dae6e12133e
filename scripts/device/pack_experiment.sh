#!/usr/bin/env bash
# scripts/device/pack_experiment.sh RUN_DIR OUT [SHIPPED_CONDITION]   (ON THE GPU MACHINE, after tandem-experiment)
# What must come back from a tandem-experiment run, as a few files under OUT (the device returns
# 8 files of <= 16 MiB): results.tar (tables, plots, eval.json, the TensorBoard report, run logs'
# tails, TensorBoard event files), stage2_cotrain.tar (the shipped co-trained policy, when present) and
# COND_final_seedN.tar per other run (its last checkpointed policy, ~10 MB, for looking at on the CPU).
set -uo pipefail
RUN=$1
OUT=$2
mkdir -p "$OUT" /tmp/pack
rm -rf /tmp/pack/*
cd "$RUN" || exit 1
for f in experiment.json experiment.md eval.json success_vs_env_steps.png heldout_sft_loss.png; do
  [ -f "$f" ] && cp "$f" /tmp/pack/
done
[ -d report ] && cp -r report /tmp/pack/report
for log in seed*/*.log; do
  [ -f "$log" ] && tail -c 200000 "$log" > "/tmp/pack/$(echo "$log" | tr / _)"
done
for tb in seed*/*/tb; do
  [ -d "$tb" ] && mkdir -p "/tmp/pack/$(dirname "$tb")" && cp -r "$tb" "/tmp/pack/$(dirname "$tb")/"
done
for s in seed*/*/summary.json; do
  [ -f "$s" ] && mkdir -p "/tmp/pack/$(dirname "$s")" && cp "$s" "/tmp/pack/$s"
done
tar -C /tmp/pack -cf "$OUT/results.tar" .
[ -d stage2_cotrain ] && tar -cf "$OUT/stage2_cotrain.tar" stage2_cotrain
SHIPPED=${3:-}  # the condition stage2_cotrain.tar already holds (experiment.ship_condition): not packed twice
for run in seed*/*/; do
  run=${run%/}
  cond=$(basename "$run")
  [ "$cond" = "$SHIPPED" ] && [ -d stage2_cotrain ] && continue
  last=$(ls -d "$run"/checkpoints/ckpt-* 2>/dev/null | sort | tail -1)  # zero-padded: lexical = numeric order
  [ -n "$last" ] && tar -cf "$OUT/${cond}_final_$(dirname "$run").tar" "$last/policy"
done
ls -la "$OUT"
