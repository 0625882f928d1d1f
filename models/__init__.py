"""ReActNet-A and the tools that read its checkpoints."""
from .checkpoint import CheckpointError, load_checkpoint
from .ops import count_ops
from .reactnet import MIN_INPUT_SIZE, reactnet

__all__ = ["reactnet", "MIN_INPUT_SIZE", "load_checkpoint", "CheckpointError", "count_ops"]
