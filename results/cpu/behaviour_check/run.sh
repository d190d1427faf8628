#!/usr/bin/env bash
# What each clean dmc-cartpole-swingup run's final policy does (README, "Learning on a CPU,
# measured"): tools/behaviour_check.py on every results/cpu/runs/<algo>/dmc-cartpole-swingup/seed<N>
# checkpoint present (written by ./benchmark.sh cpu; checkpoints are not in git), 5 evaluation
# episodes each, one <algo>-seed<N>.json per run, then the table (table.md).
#   bash results/cpu/behaviour_check/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
export MUJOCO_GL=${MUJOCO_GL:-egl}
out=results/cpu/behaviour_check
for ckpt in results/cpu/runs/*/dmc-cartpole-swingup/seed*/runs/*/checkpoint.pt; do
  algo=$(echo "$ckpt" | cut -d/ -f4); seed=$(echo "$ckpt" | cut -d/ -f6)
  python3 tools/behaviour_check.py "$ckpt" --episodes 5 > "$out/$algo-$seed.json"
done
python3 - "$out" > "$out/table.md" <<'PY'
import json, sys
from pathlib import Path
rows = []
for path in sorted(Path(sys.argv[1]).glob("*-seed*.json")):
    r = json.loads(path.read_text())
    s = r["state_abs_mean"]
    ret = sum(r["episode_returns"]) / len(r["episode_returns"])
    rows.append((path.stem, ret, r["action_saturation"], r["action_abs_mean"], s["position[0]"],
                 s["velocity[1]"]))
print("| run | return (5 episodes) | actions at the bound (abs >= 0.95) | mean abs action | mean abs cart position | mean abs pole angular velocity (rad/s) |")
print("|---|---|---|---|---|---|")
for name, ret, sat, mag, x, w in rows:
    print(f"| {name} | {ret:.0f} | {sat:.0%} | {mag:.2f} | {x:.2f} | {w:.1f} |")
PY
cat "$out/table.md"
