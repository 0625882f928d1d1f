#!/usr/bin/env bash
# AdamBNN step 1: binary activations, real weights. Edit a value here, or override it from the
# environment (e.g. `DATA=/data/imagenet EPOCHS=128 bash run.sh`); extra arguments go to train.py.
# Empty, a training variable takes the recipe's value (`python step1/train.py --help` lists them);
# the others set but empty are refused.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

DATA="${DATA-/path/to/imagenet}"    # ImageFolder root with train/ and val/
RECIPE="${RECIPE:-}"                 # training recipe (utils/recipe.py); empty: the checkpoint's, else the architecture's
ARCH="${ARCH:-}"                     # a registered architecture; empty: on resume the run's, else the default
BATCH_SIZE="${BATCH_SIZE:-}"         # global batch, split over all processes
OPTIMIZER="${OPTIMIZER:-}"           # adam (the paper's) or sgd
LEARNING_RATE="${LEARNING_RATE:-}"   # empty: the recipe's rate for the optimizer
EPOCHS="${EPOCHS:-}"
WEIGHT_DECAY="${WEIGHT_DECAY:-}"
TEACHER="${TEACHER:-}"               # torchvision model name
TEACHER_WEIGHTS="${TEACHER_WEIGHTS:-}"   # empty: torchvision's ImageNet weights
IMAGE_SIZE="${IMAGE_SIZE:-}"         # empty: on resume the run's, else the architecture's
SEED="${SEED-0}"
WORKERS="${WORKERS:-}"               # empty: chosen from the CPU count
SAVE="${SAVE-$HERE/models}"          # step 2 looks for $HERE/models/model_best.pth.tar
STEP_FLAGS=()                         # step 1 starts from scratch: an exported STEP1_CHECKPOINT is not for it
LOG="${LOG-$SAVE/run.log}"         # everything printed, errors included, is appended here
# Processes: NGPUS per node (default: every visible GPU, 1 on CPU), NNODES nodes in all.
NGPUS="${NGPUS:-}"
NNODES="${NNODES-1}"
NODE_RANK="${NODE_RANK-0}"
MASTER_ADDR="${MASTER_ADDR-127.0.0.1}"
MASTER_PORT="${MASTER_PORT-29500}"

source "$HERE/../utils/launch.sh"
