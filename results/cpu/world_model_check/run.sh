#!/usr/bin/env bash
# The world-model checks of the CPU runs (README, "Learning on a CPU, measured"): each clean
# dmc-cartpole-swingup run's final checkpoint (results/cpu/runs/<algo>/.../checkpoint.pt, written
# by ./benchmark.sh cpu; checkpoints are not in git) on its own policy's episodes (5), and on
# episodes played by random actions and by DreamingV2's agent (3 each); and, for the state probe,
# each model on 10 episodes of DreamingV2's agent (<algo>-state-probe.json).
#   bash results/cpu/world_model_check/run.sh
set -euo pipefail
cd "$(dirname "$0")/../../.."
export MUJOCO_GL=${MUJOCO_GL:-egl}
out=results/cpu/world_model_check
ckpt() { ls results/cpu/runs/"$1"/dmc-cartpole-swingup/seed1/runs/*/checkpoint.pt; }
for algo in dreamerv2 blast dreamingv2; do
  python3 tools/world_model_check.py "$(ckpt "$algo")" --episodes 5 > "$out/$algo.json"
  python3 tools/world_model_check.py "$(ckpt "$algo")" --episodes 3 --policy random \
    > "$out/$algo-played-by-random.json"
  if [ "$algo" != dreamingv2 ]; then
    python3 tools/world_model_check.py "$(ckpt "$algo")" --episodes 3 \
      --policy "$(ckpt dreamingv2)" > "$out/$algo-played-by-dreamingv2.json"
  fi
done
for algo in dreamerv2 blast dreamingv2; do
  python3 tools/world_model_check.py "$(ckpt "$algo")" --episodes 10 --policy "$(ckpt dreamingv2)" \
    > "$out/$algo-state-probe.json"
done
# DreamingV2's seed 2 (on the plateau): its own policy's episodes (5; with the state probe) and
# the random-action episodes the seed-1 models were checked on (3)
seed2=$(ls results/cpu/runs/dreamingv2/dmc-cartpole-swingup/seed2/runs/*/checkpoint.pt)
python3 tools/world_model_check.py "$seed2" --episodes 5 > "$out/dreamingv2-seed2.json"
python3 tools/world_model_check.py "$seed2" --episodes 3 --policy random > "$out/dreamingv2-seed2-played-by-random.json"
