# Sourced by step1/run.sh and step2/run.sh after they set their variables: turns the variables
# into train.py flags and starts one process, or torchrun when there are several.

# The variables are checked before anything starts; a bad one stops the run with one line.
refuse() { echo "error: $1" >&2; exit 2; }
for name in DATA SEED SAVE LOG NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
  [ -n "${!name}" ] || refuse "$name is set but empty: give it a value, or unset it for the default"
done
for name in BATCH_SIZE EPOCHS IMAGE_SIZE SEED NODE_RANK MASTER_PORT WORKERS NGPUS NNODES; do
  [[ "${!name}" =~ ^[0-9]*$ ]] || refuse "$name=${!name} is not a whole number"
done
for name in NGPUS NNODES; do
  [ "${!name:-1}" -ge 1 ] || refuse "$name=${!name}: at least 1 process per node and 1 node"
done
[ ! -d "$LOG" ] || refuse "LOG=$LOG is a folder: give the file to append the output to"

flags=(--data "$DATA" --seed "$SEED" --save "$SAVE")
# An empty variable passes no flag: train.py takes the checkpoint's, the recipe's or the
# architecture's value (the rate follows the optimizer, also one named among the extra arguments).
for name in RECIPE ARCH BATCH_SIZE OPTIMIZER LEARNING_RATE EPOCHS WEIGHT_DECAY TEACHER TEACHER_WEIGHTS \
            IMAGE_SIZE WORKERS; do
  if [ -n "${!name:-}" ]; then flags+=("--${name,,}" "${!name}"); fi
done
flags+=("${STEP_FLAGS[@]}")   # what only this step takes

if [ -z "$NGPUS" ]; then
  NGPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if [ "$NGPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  launcher=(torchrun --nnodes "$NNODES" --nproc_per_node "$NGPUS" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  launcher=(python)
fi

# A scheduler's SIGTERM (scancel, preemption) or Ctrl-C reaches every process of the job: train.py
# then saves a checkpoint and exits with 128 + the signal's number. This script waits for it (tee
# ignores the signal so that the last lines still reach the log) and exits with that status.
# torchrun passes the signal on to its processes but exits 1 itself; the run's own log says
# whether they stopped and saved.
signalled=0
trap 'signalled=143' TERM
trap 'signalled=130' INT
status=0
# The log goes beside the checkpoints; if that folder cannot be made, train.py says why.
if mkdir -p "$(dirname "$LOG")" 2>/dev/null && touch "$LOG" 2>/dev/null; then
  "${launcher[@]}" "$HERE/train.py" "${flags[@]}" "$@" 2>&1 | (trap '' INT TERM; exec tee -a "$LOG") \
    || status=$?
else
  "${launcher[@]}" "$HERE/train.py" "${flags[@]}" "$@" || status=$?
fi
if [ "$signalled" -ne 0 ] && [ "$status" -ne "$signalled" ] && [ "$status" -ne 0 ] \
    && [[ "$(tail -n 1 "$SAVE/log.txt" 2>/dev/null)" == "=> stopped by "* ]]; then
  echo "=> the training processes stopped and saved (above); exiting with status $signalled" >&2
  status=$signalled
fi
exit "$status"
