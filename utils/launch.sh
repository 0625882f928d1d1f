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
[ "$MASTER_PORT" -ge 1 ] && [ "$MASTER_PORT" -le 65535 ] \
  || refuse "MASTER_PORT=$MASTER_PORT is not a TCP port: use one from 1 to 65535 that is free on the first node"
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

# Stops. train.py saves a checkpoint on SIGTERM or SIGINT and exits with 128 + the signal's number
# (a second SIGINT stops it at once). It runs in a process group of its own, and this script passes
# each stop on to it exactly once, however the stop arrives: to the job's whole process group
# (Ctrl-C, killpg), or to this shell alone (sbatch --signal=B:TERM, kill PID). A hang-up (the
# terminal closed) stops it as SIGTERM would. This script then exits with the training's status.
# torchrun passes the signal on to its processes but exits 1 itself; the run's own log says
# whether they stopped and saved.
set -m
signalled=0
pid=""
forward() {
  signalled=$1
  if [ -n "$pid" ]; then kill -"$2" "$pid" 2>/dev/null || true; fi
}
trap 'forward 143 TERM' TERM
trap 'forward 130 INT' INT
trap 'forward 129 TERM' HUP
# The log goes beside the checkpoints (tee ignores the stops so that the last lines still reach it);
# if that folder cannot be made, train.py says why.
if mkdir -p "$(dirname "$LOG")" 2>/dev/null && touch "$LOG" 2>/dev/null; then
  exec {console}> >(trap '' INT TERM HUP; exec tee -a "$LOG")
  tee_pid=$!
  "${launcher[@]}" "$HERE/train.py" "${flags[@]}" "$@" >&"$console" 2>&1 &
else
  "${launcher[@]}" "$HERE/train.py" "${flags[@]}" "$@" &
fi
pid=$!
# A trapped signal interrupts wait with a status above 128 while the training still runs.
while :; do
  wait "$pid" && status=0 || status=$?
  if [ "$status" -le 128 ] || ! kill -0 "$pid" 2>/dev/null; then break; fi
done
if [ -n "${tee_pid:-}" ]; then
  exec {console}>&-
  while kill -0 "$tee_pid" 2>/dev/null; do sleep 0.1; done
fi
if [ "$signalled" -ne 0 ] && [ "$status" -ne "$signalled" ] && [ "$status" -ne 0 ] \
    && [[ "$(tail -n 1 "$SAVE/log.txt" 2>/dev/null)" == "=> stopped by "* ]]; then
  echo "=> the training processes stopped and saved (above); exiting with status $signalled" >&2
  status=$signalled
fi
exit "$status"
