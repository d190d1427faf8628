#!/usr/bin/env bash
# Speed and learning benchmarks for every algorithm script. See `./benchmark.sh --help`.
#   ./benchmark.sh speed            # seconds per update, acting env steps/s, memory (this device)
#   ./benchmark.sh smoke            # CPU learning check on toy-reach-center vs the random policy
#   ./benchmark.sh dcs --workers 8  # CoRe's DCS dynamic-medium protocol, one GPU per job
#   ./benchmark.sh dmc --slurm --submit
#   ./benchmark.sh report dcs       # re-aggregate results/dcs (also for runs copied from elsewhere)
set -euo pipefail
cd "$(dirname "$0")"
export MUJOCO_GL="${MUJOCO_GL:-egl}"
exec "${RFWM_PYTHON:-python3}" benchmark.py "$@"  # RFWM_PYTHON: the Slurm report job's interpreter
