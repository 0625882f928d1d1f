"""The binary architectures, their binarizers, and the tools that read their checkpoints.

Importing the package imports every module in this folder, so that each architecture and binarizer
registers itself (models/registry.py): a new file here is found without editing another.
"""
import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from models.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from models.ops import count_ops  # noqa: E402
from models.reactnet import MIN_INPUT_SIZE, reactnet  # noqa: E402
from models.spec import RunSpec, build_model  # noqa: E402

__all__ = ["reactnet", "MIN_INPUT_SIZE", "build_model", "RunSpec", "load_checkpoint", "CheckpointError", "count_ops"]
