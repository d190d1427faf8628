#!/usr/bin/env bash
# Runs ON a GPU machine (a copy of the project with the packages gpu-check.sh names beside it): many short `--preset small` runs on
# dmc-cartpole-swingup at once, one process per variant, to compare learning per update quickly
# before committing the hour-long CPU runs of `./benchmark.sh cpu`. The returns do not depend on
# the device; the minutes do.
#   bash tools/gpu-learning-sweep.sh [MINUTES]    (default 5; every run is stopped then)
# Writes $OUT/sweep.log (every evaluation line) and $OUT/sweep.tar (each run's metrics.jsonl, log).
set -uo pipefail
minutes=${1:-5}
exec > >(tee "$OUT/sweep.log") 2>&1
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
tar xJf .devsite.tar.xz -C /tmp || exit 1
ROOT=$PWD
export PYTHONPATH=/tmp/.devsite:$ROOT MUJOCO_GL=egl PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi -L
common="--env dmc-cartpole-swingup --preset small --device cuda --total-steps 100000 --eval-every 10000 --eval-episodes 5"
declare -A runs=(
  [dv2-small]="dreamerv2.py"
  [dv2-official-lr]="dreamerv2.py --model-lr 3e-4 --actor-lr 8e-5 --critic-lr 8e-5"
  [dv2-entropy1e-3]="dreamerv2.py --actor-entropy 1e-3"
  [dv2-train-every3]="dreamerv2.py --train-every 3"
  [dv2-len32]="dreamerv2.py --batch-length 32 --train-every 12"
  [dv2-seed2]="dreamerv2.py --seed 2"
  [core-small]="core.py"
  [dreamingv2-small]="dreamingv2.py"
  [blast-small]="blast.py"
  [cvrl-small]="cvrl.py --mpc-iterations 1"
)
# Outside the project folder: the device tool re-syncs the working tree before each call, which
# would delete a run folder that is not in git.
W=/tmp/sweep
pids=()
for name in "${!runs[@]}"; do
  mkdir -p "$W/$name"
  (cd "$W/$name" && timeout -s INT -k 30 $((minutes * 60)) python3 "$ROOT/${runs[$name]%% *}" \
     $common ${runs[$name]#*.py} > log.txt 2>&1) &
  pids+=($!)
done
# `wait` with no arguments would also wait for the `tee` above, which ends only with this script.
wait "${pids[@]}"
for name in $(printf '%s\n' "${!runs[@]}" | sort); do
  echo "== $name: ${runs[$name]}"
  grep -E "eval at|error|Error" "$W/$name/log.txt" | head -n 12
  grep -E "^step" "$W/$name/log.txt" | tail -n 1
done
(cd "$W" && tar cf "$OUT/sweep.tar" $(find . -name metrics.jsonl -o -name log.txt))
