#!/usr/bin/env bash
# The whole pipeline on a CPU in a few minutes, offline: writes a small synthetic dataset, trains a
# real-valued teacher on it, runs step 1 and step 2 through their run.sh, evaluates step 2's best
# checkpoint and prints each stage's top-1 and time. Only the sizes are scaled down (32 px images,
# a few epochs); the code path is the real one. Every DEMO_* value can be overridden from the
# environment, e.g. `DEMO_OUT=/tmp/demo bash demo.sh`. Each run starts from scratch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

OUT="${DEMO_OUT:-$ROOT/demo_output}"
CLASSES="${DEMO_CLASSES:-3}"
TRAIN_PER_CLASS="${DEMO_TRAIN_PER_CLASS:-200}"
VAL_PER_CLASS="${DEMO_VAL_PER_CLASS:-50}"
IMAGE_SIZE="${DEMO_IMAGE_SIZE:-32}"       # training crop; the files are 1.25x larger to crop from
BATCH_SIZE="${DEMO_BATCH_SIZE:-16}"      # small batches: more optimizer steps in the time
TEACHER="${DEMO_TEACHER:-resnet18}"
TEACHER_EPOCHS="${DEMO_TEACHER_EPOCHS:-8}"
TEACHER_LR="${DEMO_TEACHER_LR:-2e-3}"
STEP_EPOCHS="${DEMO_STEP_EPOCHS:-4}"      # per step; the schedule's last epoch runs at lr 0
STEP_LR="${DEMO_STEP_LR:-1e-3}"
WORKERS="${DEMO_WORKERS:-0}"               # the images are tiny: loading in the main process is fastest
SEED="${DEMO_SEED:-0}"
STEP_ARGS=(--print_freq 1000 --fused_optimizer)  # a progress line at the start and end of each epoch

# The tools are modules of the repository: python -m tools.NAME, with the repository importable.
TOOL=(env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python -m)
DATA="$OUT/data"
LOGS="$OUT/logs"
STAGES=()
declare -A TOP1 TIME

# stage NAME COMMAND...: runs COMMAND, shows its output and keeps it in $LOGS/NAME.log, and records
# its wall time; a failure stops the demo.
stage() {
  local name=$1 start
  shift
  echo
  echo "=== $name: $*"
  start=$(date +%s.%N)
  if ! "$@" 2>&1 | tee "$LOGS/$name.log"; then
    echo "error: the demo stopped because stage '$name' failed (output above and in $LOGS/$name.log)" >&2
    exit 1
  fi
  STAGES+=("$name")
  TIME[$name]=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
}

# last_number NAME PATTERN: the number after the last match of PATTERN in the stage's log.
last_number() {
  grep -oE "$2 [0-9.]+" "$LOGS/$1.log" | tail -n 1 | awk '{ print $NF }'
}

# Start fresh, but only remove what this script writes.
rm -rf "$DATA" "$LOGS" "$OUT/teacher.pth" "$OUT/step1" "$OUT/step2"
mkdir -p "$LOGS"
demo_start=$(date +%s.%N)

stage data "${TOOL[@]}" tools.make_demo_data --out "$DATA" --classes "$CLASSES" \
  --train_per_class "$TRAIN_PER_CLASS" --val_per_class "$VAL_PER_CLASS" \
  --size $((IMAGE_SIZE * 5 / 4)) --seed "$SEED"

stage teacher "${TOOL[@]}" tools.train_teacher --data "$DATA" --arch "$TEACHER" \
  --epochs "$TEACHER_EPOCHS" --learning_rate "$TEACHER_LR" --batch_size "$BATCH_SIZE" \
  --image_size "$IMAGE_SIZE" -j "$WORKERS" --seed "$SEED" --out "$OUT/teacher.pth"
TOP1[teacher]=$(last_number teacher "val acc@1")

# The steps get everything through run.sh's variables, as a user would set them; the recipe's
# optimizer, weight decay, schedule and loss stay run.sh's defaults.
step_env=(DATA="$DATA" BATCH_SIZE="$BATCH_SIZE" LEARNING_RATE="$STEP_LR" EPOCHS="$STEP_EPOCHS"
          TEACHER="$TEACHER" TEACHER_WEIGHTS="$OUT/teacher.pth" IMAGE_SIZE="$IMAGE_SIZE"
          SEED="$SEED" WORKERS="$WORKERS" NGPUS=1 NNODES=1)
stage step1 env "${step_env[@]}" SAVE="$OUT/step1" LOG="$OUT/step1/run.log" \
  bash "$ROOT/step1/run.sh" "${STEP_ARGS[@]}"
TOP1[step1]=$(last_number step1 "best acc@1")

stage step2 env "${step_env[@]}" SAVE="$OUT/step2" LOG="$OUT/step2/run.log" \
  STEP1_CHECKPOINT="$OUT/step1/model_best.pth.tar" bash "$ROOT/step2/run.sh" "${STEP_ARGS[@]}"
TOP1[step2]=$(last_number step2 "best acc@1")

stage evaluate python "$ROOT/evaluate.py" --data "$DATA" --checkpoint "$OUT/step2/model_best.pth.tar" \
  --image_size "$IMAGE_SIZE" --batch_size 100 -j "$WORKERS" --print_freq 1000
TOP1[evaluate]=$(last_number evaluate "\* acc@1")

echo
echo "=== demo summary: $CLASSES classes, so chance is $(awk -v k="$CLASSES" 'BEGIN { printf "%.1f", 100 / k }')% top-1"
printf "%-10s %10s %10s\n" stage "top-1 (%)" "time (s)"
for name in "${STAGES[@]}"; do
  printf "%-10s %10s %10s\n" "$name" "${TOP1[$name]:--}" "${TIME[$name]}"
done
printf "%-10s %10s %10s\n" total "" "$(awk -v a="$demo_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
echo "teacher: $TEACHER (real-valued); step 1: binary activations, real weights; step 2: binary"
echo "activations and weights; evaluate: evaluate.py on step 2's best checkpoint. Logs: $LOGS"
