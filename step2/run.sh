#!/usr/bin/env bash
# AdamBNN step 2: binary activations and weights, started from step 1. Edit a value here, or override it from the
# environment (e.g. `DATA=/data/imagenet EPOCHS=128 bash run.sh`); extra arguments go to train.py.
# Empty, a training variable takes the recipe's value (`python step2/train.py --help` lists them);
# the others set but empty are refused.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DATA="${DATA-/path/to/imagenet}"    # ImageFolder root with train/ and val/
RECIPE="${RECIPE:-}"                 # training recipe (utils/recipe.py); empty: the checkpoint's, else the architecture's
ARCH="${ARCH:-}"                     # a registered architecture; empty: the checkpoint's
BATCH_SIZE="${BATCH_SIZE:-}"         # global batch, split over all processes
OPTIMIZER="${OPTIMIZER:-}"           # adam (the paper's) or sgd
LEARNING_RATE="${LEARNING_RATE:-}"   # empty: the recipe's rate for the optimizer
EPOCHS="${EPOCHS:-}"
WEIGHT_DECAY="${WEIGHT_DECAY:-}"
TEACHER="${TEACHER:-}"               # torchvision model name
TEACHER_WEIGHTS="${TEACHER_WEIGHTS:-}"   # empty: torchvision's ImageNet weights
IMAGE_SIZE="${IMAGE_SIZE:-}"         # empty: the checkpoint's (step 1's; on resume the run's), else the architecture's
SEED="${SEED-0}"
WORKERS="${WORKERS:-}"               # empty: chosen from the CPU count
SAVE="${SAVE-$HERE/models}"
STEP1_CHECKPOINT="${STEP1_CHECKPOINT-$(dirname "$HERE")/step1/models/model_best.pth.tar}"   # none: from scratch
STEP_FLAGS=(--step1_checkpoint "$STEP1_CHECKPOINT")
LOG="${LOG-$SAVE/run.log}"         # everything printed, errors included, is appended here
# Processes: NGPUS per node (default: every visible GPU, 1 on CPU), NNODES nodes in all.
NGPUS="${NGPUS:-}"
NNODES="${NNODES-1}"
NODE_RANK="${NODE_RANK-0}"
MASTER_ADDR="${MASTER_ADDR-127.0.0.1}"
MASTER_PORT="${MASTER_PORT-29500}"

source "$HERE/../utils/launch.sh"
