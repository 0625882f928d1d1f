"""The binary architectures, their binarizers, and the tools that read their checkpoints.

Importing the package registers every built-in architecture and binarizer (models/registry.py).
"""
from . import binarize, published, reactnet18  # noqa: F401  (they register themselves)
from .checkpoint import CheckpointError, load_checkpoint
from .ops import count_ops
from .reactnet import MIN_INPUT_SIZE, reactnet
from .registry import ModelSpec, build_model

__all__ = ["reactnet", "MIN_INPUT_SIZE", "build_model", "ModelSpec", "load_checkpoint", "CheckpointError", "count_ops"]
