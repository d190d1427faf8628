#!/usr/bin/env bash
# What each clean dmc-cartpole-swingup run's final policy does (README, "Learning on a CPU,
# measured"): tools/behaviour_check.py on every results/cpu/runs/<algo>/dmc-cartpole-swingup/seed<N>
# checkpoint present (written by ./benchmark.sh cpu; checkpoints are not in git), 5 evaluation
# episodes each with the mode actions of the evaluations (<algo>-seed<N>.json), with the sampled
# actions of training (<algo>-seed<N>-explore.json) and, for the Dreamer family, with the truncated
# normal's mean (<algo>-seed<N>-mean.json), then the table (table.md).
#   bash results/cpu/behaviour_check/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
export MUJOCO_GL=${MUJOCO_GL:-egl}
out=results/cpu/behaviour_check
for ckpt in results/cpu/runs/*/dmc-cartpole-swingup/seed*/runs/*/checkpoint.pt; do
  algo=$(echo "$ckpt" | cut -d/ -f4); seed=$(echo "$ckpt" | cut -d/ -f6)
  python3 tools/behaviour_check.py "$ckpt" --episodes 5 > "$out/$algo-$seed.json"
  python3 tools/behaviour_check.py "$ckpt" --episodes 5 --actions explore > "$out/$algo-$seed-explore.json"
  case $algo in dreamerv2|dreamingv2|blast)
    python3 tools/behaviour_check.py "$ckpt" --episodes 5 --actions mean > "$out/$algo-$seed-mean.json"
  esac
done
python3 - "$out" > "$out/table.md" <<'PY'
import json, sys
from pathlib import Path
rows = []
mean = lambda r: sum(r["episode_returns"]) / len(r["episode_returns"])  # noqa: E731


def other(path, actions):
    """(return, saturation) of the same run played with other actions, as text; '-' if not run."""
    p = path.with_name(f"{path.stem}-{actions}.json")
    if not p.exists():
        return "-", "-"
    r = json.loads(p.read_text())
    return f"{mean(r):.0f}", f"{r['action_saturation']:.0%}"


for path in sorted(Path(sys.argv[1]).glob("*-seed[0-9].json")):
    r = json.loads(path.read_text())
    s = r["state_abs_mean"]
    rows.append((path.stem, mean(r), r["action_saturation"], r["action_abs_mean"], s["position[0]"],
                 s["velocity[1]"], *other(path, "explore"), other(path, "mean")[0]))
print("| run | return (5 episodes) | actions at the bound (abs >= 0.95) | mean abs action | mean abs cart position | mean abs pole angular velocity (rad/s) | return with training's sampled actions | their actions at the bound | return with the truncated normal's mean |")
print("|---|---|---|---|---|---|---|---|---|")
for name, ret, sat, mag, x, w, ret_e, sat_e, ret_m in rows:
    print(f"| {name} | {ret:.0f} | {sat:.0%} | {mag:.2f} | {x:.2f} | {w:.1f} | {ret_e} | {sat_e} | {ret_m} |")
PY
cat "$out/table.md"
