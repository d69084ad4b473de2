#!/usr/bin/env bash
# The GPU check of blending speed and memory, self-contained for a machine with an NVIDIA GPU and no network.
#
#   benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# Installs what is missing (a typical GPU image has torch, peft, transformers and accelerate but not diffusers) from
# the wheels in WHEEL_DIR (default: benchmarks/wheels; fill it on a connected machine with
#   pip download --no-deps -d benchmarks/wheels diffusers safetensors typer rich shellingham
# ), then runs the SD1.5-sized benchmark at 512² (64² latents), 50 steps with CFG, M ∈ {2, 4}, batch ∈ {1, 4}, fp16,
# writing one JSON per run and the GPU's description into OUT_DIR, and counts the host synchronisations of blended
# steps (host_sync_check.py). About 6 minutes on an H100. GPU_CHECK_COMPILE=1 adds the torch.compile comparison
# (M = 2, batch 1, 10 steps; a few more minutes of compilation).
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]}
here=$(cd "$(dirname "$0")" && pwd)
wheels=${2:-$here/wheels}
python=${PYTHON:-python3}
mkdir -p "$out"
for module in diffusers peft safetensors typer rich; do
  if ! "$python" -c "import $module" 2>/dev/null; then
    "$python" -m pip install --quiet --no-index --find-links "$wheels" "$module"
  fi
done
export PYTHONPATH="$(dirname "$here")/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.csv"
"$python" -c "import torch, diffusers, peft; print(torch.__version__, diffusers.__version__, peft.__version__)" \
  > "$out/versions.txt"
for members in 2 4; do
  for batch in 1 4; do
    full=()
    [ "$members" = 2 ] && [ "$batch" = 1 ] && full=(--full)  # full-module members: sequential vs vmapped
    "$python" "$here/blend_speed.py" --config sd15 --members "$members" --batch "$batch" --steps 50 \
      --dtype fp16 --device cuda --repeats 3 --warmup 1 ${full[@]+"${full[@]}"} --json > "$out/sd15_m${members}_b${batch}.json"
    cat "$out/sd15_m${members}_b${batch}.json"
  done
done
"$python" "$here/host_sync_check.py" --config sd15 --json > "$out/host_syncs.json"
cat "$out/host_syncs.json"
if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then
  "$python" "$here/blend_speed.py" --config sd15 --members 2 --batch 1 --steps 10 --dtype fp16 --device cuda \
    --repeats 3 --warmup 1 --compile --json > "$out/sd15_m2_b1_compiled.json"
  cat "$out/sd15_m2_b1_compiled.json"
fi
