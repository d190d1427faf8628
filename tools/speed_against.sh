#!/usr/bin/env bash
# Seconds per update of each algorithm script here against a reference checkout of an earlier
# version (git worktree add <dir> <commit>): both at once, one thread each, `--preset small` on
# dmc-cartpole-swingup, 10 updates on a synthetic batch (`--measure-updates`). Same conditions
# for both, so a restructuring that keeps the computation shows the same figure within noise.
#   bash tools/speed_against.sh <reference-checkout> [algo ...]
set -euo pipefail
ref=${1:?usage: bash tools/speed_against.sh <reference-checkout> [algo ...]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
ref=$(cd "$ref" && pwd)
export MUJOCO_GL=${MUJOCO_GL:-egl} OMP_NUM_THREADS=1
out=$(mktemp -d)
algos=("$@")
[ ${#algos[@]} -gt 0 ] || algos=(dreamerv2 core cvrl blast dreamingv2)
for a in "${algos[@]}"; do
  (cd "$ref" && PYTHONPATH=. python3 "$a.py" --preset small --env dmc-cartpole-swingup \
     --measure-updates 10 2>/dev/null | tail -1 > "$out/ref_$a.json") &
  (cd "$here" && PYTHONPATH=. python3 "$a.py" --preset small --env dmc-cartpole-swingup \
     --measure-updates 10 2>/dev/null | tail -1 > "$out/new_$a.json") &
  wait
  python3 - "$out/ref_$a.json" "$out/new_$a.json" "$a" <<'PY'
import json, sys
ref, new = (json.load(open(p)) for p in sys.argv[1:3])
print(f"{sys.argv[3]}: reference {ref['seconds_per_update']:.3f} s/update, here {new['seconds_per_update']:.3f}")
PY
done
rm -rf "$out"
