# Sourced by step1/run.sh and step2/run.sh after they set their variables: turns the variables
# into train.py flags and starts one process, or torchrun when there are several.

flags=(--data "$DATA" --batch_size "$BATCH_SIZE" --optimizer "$OPTIMIZER"
       --epochs "$EPOCHS" --weight_decay "$WEIGHT_DECAY" --teacher "$TEACHER"
       --image_size "$IMAGE_SIZE" --seed "$SEED" --save "$SAVE")
# Unset, the rate follows the optimizer, also one named among the extra arguments.
if [ -n "$LEARNING_RATE" ]; then flags+=(--learning_rate "$LEARNING_RATE"); fi
if [ -n "$TEACHER_WEIGHTS" ]; then flags+=(--teacher_weights "$TEACHER_WEIGHTS"); fi
if [ -n "$WORKERS" ]; then flags+=(--workers "$WORKERS"); fi
if [ -n "$ARCH" ]; then flags+=(--arch "$ARCH"); fi
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

# The log goes beside the checkpoints; if that folder cannot be made, train.py says why.
if mkdir -p "$(dirname "$LOG")" 2>/dev/null && touch "$LOG" 2>/dev/null; then
  "${launcher[@]}" "$HERE/train.py" "${flags[@]}" "$@" 2>&1 | tee -a "$LOG"
else
  "${launcher[@]}" "$HERE/train.py" "${flags[@]}" "$@"
fi
