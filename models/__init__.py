"""ReActNet-A and the tools that read its checkpoints."""
from .checkpoint import CheckpointError, load_checkpoint
from .reactnet import reactnet

__all__ = ["reactnet", "load_checkpoint", "CheckpointError"]
