"""ReActNet-A and the tools that read its checkpoints."""
from .checkpoint import CheckpointError, load_checkpoint
from .ops import count_ops
from .reactnet import reactnet

__all__ = ["reactnet", "load_checkpoint", "CheckpointError", "count_ops"]
