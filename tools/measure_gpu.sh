#!/usr/bin/env bash
# Every GPU figure docs/speed.md quotes, in one run of about 5 minutes on one H200 with 16 CPU cores:
# 1. the hazard of each device JPEG decoder (torchcodec's, torchvision's), with the guard and
#    without it (tests/test_cuda.py as a script);
# 2. the CUDA tests: the hazard test and each kind of JPEG decoded by nvjpeg against PIL (path
#    taken, grey-level differences printed per kind), per decoder; CUDA bits equal to CPU bits; a
#    --deterministic run with each data backend (and each decoder) killed inside an epoch and
#    rerun, bit-identical to one uninterrupted;
# 3. the benchmark at 224x224, batch 256, step 2: compute-only rows against the published
#    formulation, then training fed end to end from a folder of ImageNet-sized JPEG files with
#    each decode option (pil; gpu with each decoder and each share of the files left to PIL in the
#    workers: images/s and data wait), and the loader alone per backend and worker count.
# Results go to $OUT (default gpu_measurements/). From the repository root: bash tools/measure_gpu.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-gpu_measurements}"
PYTHON="${PYTHON:-python3}"
WORKERS="${WORKERS:-15}"      # one CPU left for the training loop
SHARES="${SHARES:-0 0.2 0.3 0.4 0.5}"  # --cpu_decode_share values timed end to end
DECODERS="${DECODERS:-torchcodec torchvision}"  # --jpeg_decoder values timed end to end
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
started=$SECONDS
elapsed() { echo "[$1: $((SECONDS - started)) s since the start]" | tee -a "$OUT/machine.txt"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PYTHON" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  "$PYTHON" -c "import torchcodec; print('torchcodec', torchcodec.__version__)" 2>&1 | tail -1 || true
  echo "CPUs: $(nproc)"; } | tee "$OUT/machine.txt"

# A failed step is reported in its file; the measurements after it still run.
"$PYTHON" tests/test_cuda.py 2>&1 | tee "$OUT/decode_hazard.txt" || true
elapsed "decode hazard"
"$PYTHON" -m pytest -q -s -rs tests/test_cuda.py tests/test_data_pipeline.py tests/test_decode_resume.py -k cuda \
  2>&1 | tee "$OUT/cuda_tests.txt" || true
elapsed "CUDA tests"

FAST=ours+bf16+channels_last+fused_adam+compile
# shellcheck disable=SC2086  # SHARES and DECODERS are lists
"$PYTHON" -m tools.benchmark --device cuda --image_size 224 --batch_size 256 --teacher resnet34 \
  --recipe_steps 2 --steps 5 --warmup 3 --repeats 3 \
  --configs baseline ours ours+deterministic ours+bf16+channels_last+fused_adam "$FAST" \
  --end_to_end --end_to_end_configs "$FAST" --end_to_end_workers "$WORKERS" --end_to_end_iterations 20 \
  --cpu_decode_shares $SHARES --jpeg_decoders $DECODERS \
  --loader --loader_images 2048 --loader_workers 8 "$WORKERS" \
  --out "$OUT/benchmark.json" 2>"$OUT/benchmark.log" | tee "$OUT/benchmark.md"
elapsed "benchmark"
