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
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$NGPUS" -gt 1 ] || [ "$NNODES" -gt 1 ]; then
  # The first node serves the rendezvous on MASTER_PORT: one that is taken would end torchrun in a
  # long traceback, so it is tried here first.
  if [ "$NODE_RANK" -eq 0 ]; then
    taken=$(python -c 'import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("", int(sys.argv[1])))
    except OSError as e:
        print(e.strerror)' "$MASTER_PORT")
    [ -z "$taken" ] || refuse "MASTER_PORT=$MASTER_PORT cannot be used on this node, the first \
($taken): another job or a run still ending holds it; pick a free port, e.g. \
MASTER_PORT=$((MASTER_PORT % 65535 + 1)), the same on every node"
  fi
  # torchrun runs through utils/startup.py so that it ends with this script, and passes every stop
  # below on to its processes (by default it would die of SIGUSR1 and SIGUSR2; its option
  # --signals_to_handle reads PET_SIGNALS_TO_HANDLE, which torch before 2.9 read as
  # TORCHELASTIC_SIGNALS_TO_HANDLE).
  stops=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2
  launcher=(env PET_SIGNALS_TO_HANDLE=$stops TORCHELASTIC_SIGNALS_TO_HANDLE=$stops
            python -c 'import sys; sys.path.insert(0, sys.argv.pop(1))
from utils.startup import run_torchrun; run_torchrun()' "$REPO" --nnodes "$NNODES" --nproc_per_node "$NGPUS" --node_rank "$NODE_RANK"
            --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  launcher=(python)
fi

# Stops. train.py saves a checkpoint on SIGTERM, SIGINT, SIGUSR1 or SIGUSR2 and exits with 128 +
# the signal's number (a second SIGINT stops it at once). It runs in a process group of its own, and
# this script passes each stop on to it exactly once, however the stop arrives: to the job's whole
# process group (Ctrl-C, killpg), or to this shell alone (sbatch --signal=B:USR1@T, kill PID). A
# hang-up (the terminal closed) stops it as SIGTERM would. This script then exits with the
# training's status. torchrun passes the signal on to its processes but exits 1 itself; the run's
# own log says whether they stopped and saved. If this script is killed outright (SIGKILL), the
# training gets SIGTERM from the kernel (utils/startup.py) and stops the same way.
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
trap 'forward 138 USR1' USR1
trap 'forward 140 USR2' USR2
export BNN_LAUNCHER_PID=$$
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
