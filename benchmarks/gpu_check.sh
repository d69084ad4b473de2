#!/usr/bin/env bash
# The GPU check of blending speed and memory, self-contained for a machine with an NVIDIA GPU and no network.
#
#   benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# A typical GPU image has torch, peft, transformers and accelerate but not diffusers. Every wheel in WHEEL_DIR
# (default: benchmarks/wheels) is installed without its dependencies into a private folder put first on the Python
# path, so the image's own packages stay as they are; fill WHEEL_DIR on a connected machine with the versions the
# tests ran with (pure-Python wheels, any platform):
#   pip download --no-deps -d benchmarks/wheels diffusers==0.42.1 peft==0.21.2
# Then it runs the SD1.5-sized benchmark (blend_speed.py) at 512² (64² latents), 50 steps with CFG, fp16, for
# M ∈ {2, 4} and batch ∈ {1, 4}, the most important first (batch 1 carries the targets), with the full-module
# comparison and a sweep of 4 weight mixes in one batch at M = 2, batch 1, and counts the host synchronisations of
# blended steps (host_sync_check.py).
# It writes three files into OUT_DIR, each as soon as it has something: environment.txt (GPU, versions),
# results.jsonl (one JSON object per benchmark run) and log.txt (everything printed, with each run's duration), so
# a run stopped early still leaves what it measured. About 4-6 minutes on an H100 (an estimate).
# GPU_CHECK_COMPILE=1 adds the torch.compile comparison (M = 2, batch 1, 10 steps; minutes of compilation).
#
# GPU_CHECK_DEVICE, GPU_CHECK_CONFIG, GPU_CHECK_STEPS, GPU_CHECK_REPEATS and GPU_CHECK_DTYPE (defaults cuda, sd15,
# 50, 3, fp16) exist so that the tests can run the whole script on a CPU with a tiny model.
set -euo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]}
here=$(cd "$(dirname "$0")" && pwd)
wheels=${2:-$here/wheels}
python=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
config=${GPU_CHECK_CONFIG:-sd15}
steps=${GPU_CHECK_STEPS:-50}
repeats=${GPU_CHECK_REPEATS:-3}
dtype=${GPU_CHECK_DTYPE:-fp16}
mkdir -p "$out"
exec > >(tee -a "$out/log.txt") 2>&1
log_writer=$!
# on exit (early ones too) let tee write the last lines before the caller collects OUT_DIR
trap 'exec >&- 2>&-; wait "$log_writer" 2>/dev/null || true' EXIT

site=$(mktemp -d)
wheel_files=("$wheels"/*.whl)
if [ -e "${wheel_files[0]}" ]; then
  "$python" -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "${wheel_files[@]}"
fi
export PYTHONPATH="$(dirname "$here")/src:$site${PYTHONPATH:+:$PYTHONPATH}"
"$python" - "$device" > "$out/environment.txt" <<'EOF'
import importlib, sys
for name in ("torch", "diffusers", "peft", "safetensors"):
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        sys.exit(f"gpu_check: {name} cannot be imported ({error}); put its wheel in the wheel folder")
    print(name, module.__version__, module.__file__)
import torch
print("python", sys.version.split()[0])
print("device", torch.cuda.get_device_name() if sys.argv[1].startswith("cuda") else sys.argv[1])
EOF
cat "$out/environment.txt"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv \
    >> "$out/environment.txt" || echo "(nvidia-smi failed)" >> "$out/environment.txt"
fi

started=$SECONDS
bench() {  # a label, then blend_speed.py's arguments; appends the run's JSON line to results.jsonl
  local label=$1 begun=$SECONDS
  shift
  "$python" "$here/blend_speed.py" --config "$config" --device "$device" --dtype "$dtype" --steps "$steps" \
    --repeats "$repeats" --warmup 1 --json "$@" | tee -a "$out/results.jsonl"
  echo "# $label: $((SECONDS - begun)) s (check so far: $((SECONDS - started)) s)"
}
bench "M=2, batch 1, LoRA and full members, a sweep of 4 mixes" --members 2 --batch 1 --full --sweep 4
bench "M=4, batch 1" --members 4 --batch 1
if [[ $device == cuda* ]]; then
  "$python" "$here/host_sync_check.py" --config "$config" --json | tee -a "$out/results.jsonl"
fi
bench "M=2, batch 4" --members 2 --batch 4 --no-sequential
bench "M=4, batch 4" --members 4 --batch 4 --no-sequential
if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then
  bench "M=2, batch 1, compiled" --members 2 --batch 1 --steps 10 --compile
fi
"$python" "$here/blend_speed.py" --summarize "$out/results.jsonl"
