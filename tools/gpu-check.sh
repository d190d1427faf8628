#!/usr/bin/env bash
# The project's GPU check: runs ON a GPU machine without internet, in the project root, with
# the Python packages and GL libraries packed beside it by the development setup's gpu-prepare.sh
# (.devsite.tar.xz, .gl/*.deb; not part of this repository) and OUT set to a folder for the results:
#   bash tools/gpu-check.sh
# 1. each script's eager fp32 update on CUDA at paper sizes (the cheapest answer to "does it run
#    on CUDA"), 10 updates on dmc-walker-walk, at most 100 s each;
# 2. `./benchmark.sh speed` for dreamerv2 and core: fp32, compile, bf16, reduce-overhead, at most
#    120 s per variant (results/speed/<GPU name>.md/.json, written after each measurement);
# 3. if time remains, the same for blast, dreamingv2 and cvrl with fp32 and compile.
# Everything stops by GPU_CHECK_SECONDS (default 540: ~9 minutes). Writes $OUT/log.txt,
# $OUT/speed.jsonl (step 1) and $OUT/results-speed.tar (results/speed).
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
budget=${GPU_CHECK_SECONDS:-540}
left() { echo $(( budget - SECONDS )); }
cap() { local l; l=$(left); (( l < $1 )) && echo $(( l > 1 ? l : 1 )) || echo "$1"; }  # min(limit, time left)
exec > >(tee "$OUT/log.txt") 2>&1
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
tar xJf .devsite.tar.xz -C /tmp || exit 1
export PYTHONPATH=/tmp/.devsite:$PWD MUJOCO_GL=egl PYTHONUNBUFFERED=1
timeout 20 nvidia-smi -L
python3 -c "import torch, mujoco; from dm_control import suite; import gymnasium, tyro; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
save() { tar cf "$OUT/results-speed.tar" results/speed 2>/dev/null; }
trap save EXIT

for s in dreamerv2 core blast dreamingv2 cvrl; do
  [ -f $s.py ] || continue
  (( $(left) > 30 )) || break
  echo "== $s eager fp32 ($(left) s left)"
  timeout "$(cap 100)" python3 $s.py --measure-updates 10 --env dmc-walker-walk --device cuda 2>&1 \
    | grep -v WARNING | tail -3 | tee -a "$OUT/speed.jsonl"
  echo "exit ${PIPESTATUS[0]}"
done
if (( $(left) > 60 )); then
  echo "== benchmark speed: dreamerv2 core; fp32 compile bf16 reduce-overhead ($(left) s left)"
  timeout "$(cap $(( $(left) - 10 )))" ./benchmark.sh speed --algos dreamerv2 core --updates 10 \
    --variants fp32 compile bf16 reduce-overhead --variant-timeout 120
fi
if (( $(left) > 150 )); then
  echo "== benchmark speed: blast dreamingv2 cvrl; fp32 compile ($(left) s left)"
  timeout "$(cap $(( $(left) - 10 )))" ./benchmark.sh speed --algos blast dreamingv2 cvrl \
    --updates 10 --variants fp32 compile --variant-timeout 120
fi
save
ls -la results/speed
echo "done in ${SECONDS} s"
