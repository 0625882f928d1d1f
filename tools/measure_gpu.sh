#!/usr/bin/env bash
# Every GPU figure the README quotes, in one run of about 5 minutes on one H100 with 16 CPU cores:
# the CUDA tests (same bits from the data pipeline on the GPU, --deterministic repeating itself),
# then the benchmark at 224x224, batch 256, step 2: compute-only rows against the published
# formulation, training fed end to end from a folder of ImageNet-sized JPEG files with each data
# backend, and the loader alone per backend and worker count. Results go to $OUT (default
# gpu_measurements/). From the repository root: bash tools/measure_gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu_measurements}"
PYTHON="${PYTHON:-python3}"
WORKERS="${WORKERS:-15}"      # one CPU left for the training loop
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  echo "CPUs: $(nproc)"; } | tee "$OUT/machine.txt"

# A failed test is reported in its file; the measurements still run.
"$PYTHON" -m pytest -q -s tests/test_cuda.py tests/test_data_pipeline.py 2>&1 | tee "$OUT/cuda_tests.txt" || true

FAST=ours+bf16+channels_last+fused_adam+compile
"$PYTHON" -m tools.benchmark --device cuda --image_size 224 --batch_size 256 --teacher resnet34 \
  --recipe_steps 2 --steps 5 --warmup 3 --repeats 3 \
  --configs baseline ours ours+deterministic ours+bf16+channels_last ours+bf16+channels_last+fused_adam "$FAST" \
  --end_to_end --end_to_end_configs "$FAST" --end_to_end_workers "$WORKERS" --end_to_end_iterations 20 \
  --loader --loader_images 2048 --loader_workers 4 8 "$WORKERS" \
  --out "$OUT/benchmark.json" 2>"$OUT/benchmark.log" | tee "$OUT/benchmark.md"
