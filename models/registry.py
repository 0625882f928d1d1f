"""Architectures and binarizers by name, and the plugins that add more.

An architecture is a function ``build(num_classes, binary_weights)`` returning a module whose
classifier is a ``Linear`` named ``fc``, built from the blocks of models/layers.py (its binary
convolutions are ``BinaryConv2d``, its activation binarizers ``BinaryActivation``), registered with
``@register_architecture(name, title, downsampling, defaults={...})`` (``defaults``: the RunSpec
values it trains and evaluates with unless a flag or a checkpoint names others, models/spec.py). A
binarizer is a differentiable function of one tensor, registered with
``@register_act_binarizer(name)`` or ``@register_weight_binarizer(name)``. A *tempered* binarizer
(``tempered=True``) is a function ``(x, temperature, training)`` of the tensor, the ``temperature``
buffer of the module it runs in and that module's training mode; only modules with such a buffer
(BNext's) take one.

An architecture's module may define two hooks that the training engine calls: ``start_epoch(epoch)``,
before an epoch trains its first batch (once per epoch: not again when a run resumes inside it),
and ``epoch_record()``, a dict of numbers recorded with each epoch (metrics.jsonl, TensorBoard and
the epoch's line in the log).

Where they are found:

- A module in the models/ folder is a built-in: importing the package imports every module in it
  (models/__init__.py), so a new file there is found with no other file edited.
- ``BNN_PLUGINS`` names more modules to import before any lookup: Python files or importable module
  names, separated by ``os.pathsep`` (``:`` on Linux). A file is imported with its own folder on
  ``sys.path``; a file that is already imported (one in models/) is not imported again. Every entry
  point looks names up here, so a plugin's architecture or binarizer works with every command once
  the variable is set.

Either way a file imports what it builds on by absolute names (``from models.layers import
BinaryConv2d``), so that the same file works in models/ and as a plugin.
"""
import importlib
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, field

PLUGINS_VARIABLE = "BNN_PLUGINS"


class RegistryError(ValueError):
    """An unknown name, a name registered twice, or a plugin that cannot be imported."""


@dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    Attributes:
        name: the ``--arch`` value, saved in checkpoints.
        title: how logs and reports name it.
        build: ``build(num_classes, binary_weights) -> nn.Module``.
        downsampling: how many times the network shrinks the input side; smaller images are refused.
        reported_costs: the cost its paper reports at 224x224 (``bops``, ``flops``, ``ops`` and
            ``source``), which ``python -m tools.summary`` prints beside its own count; or None.
        defaults: the RunSpec fields (models/spec.py) this architecture trains and evaluates with
            when neither a flag nor a checkpoint names them, e.g. ``{"interpolation": "bicubic",
            "crop_pct": 0.95}``; the fields it leaves out keep RunSpec's (the published) values.
    """
    name: str
    title: str
    build: object
    downsampling: int
    reported_costs: dict | None = None
    defaults: dict = field(default_factory=dict)


ARCHITECTURES = {}
ACT_BINARIZERS = {}
WEIGHT_BINARIZERS = {}
_loaded_plugins = set()  # the BNN_PLUGINS entries imported


def _register(table, kind, name, value):
    if name in table:
        raise RegistryError(f"{kind} '{name}' is registered twice")
    table[name] = value


def register_architecture(name, title, downsampling=32, reported_costs=None, defaults=None):
    """Decorator registering ``build(num_classes, binary_weights)`` under ``name`` (see Architecture)."""
    def decorate(build):
        _register(ARCHITECTURES, "architecture", name,
                  Architecture(name, title, build, downsampling, reported_costs, dict(defaults or {})))
        return build
    return decorate


def register_act_binarizer(name, tempered=False, saturates_beyond=1.0):
    """Decorator registering an activation binarizer (a function of the pre-binarization tensor).

    Args:
        tempered: the function takes ``(x, temperature, training)`` (see the module docstring).
        saturates_beyond: the ``|x|`` beyond which its surrogate gradient is 0, where the
            saturation measurement (utils/monitor.py) counts an activation as saturated.
    """
    def decorate(function):
        _register(ACT_BINARIZERS, "activation binarizer", name, function)
        function.tempered, function.saturates_beyond = tempered, saturates_beyond
        return function
    return decorate


def register_weight_binarizer(name, tempered=False):
    """Decorator registering a weight binarizer (a function of a conv's latent weight tensor;
    ``tempered``: of ``(weight, temperature, training)``)."""
    def decorate(function):
        _register(WEIGHT_BINARIZERS, "weight binarizer", name, function)
        function.tempered = tempered
        return function
    return decorate


def load_plugins():
    """Imports the modules ``BNN_PLUGINS`` names, once each."""
    for entry in filter(None, os.environ.get(PLUGINS_VARIABLE, "").split(os.pathsep)):
        if entry in _loaded_plugins:
            continue
        try:
            if entry.endswith(".py"):
                import_file(entry)
            else:
                importlib.import_module(entry)
        except Exception as e:  # whatever a plugin raises while it is imported is the plugin's
            raise RegistryError(f"cannot import the plugin '{entry}' named in {PLUGINS_VARIABLE} "
                                f"({where_it_failed(e)}): fix or remove it") from None
        _loaded_plugins.add(entry)


def where_it_failed(error):
    """``error`` in one line, with the file and line it was raised at."""
    if isinstance(error, SyntaxError):
        return f"{type(error).__name__}: {error.msg} at {error.filename} line {error.lineno}"
    message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        message += f" at {frames[-1].filename} line {frames[-1].lineno}"
    return message


def import_file(path):
    """Imports the Python file ``path`` as a module named after it, unless a module already
    imported is that file: a file in models/ is imported with the package, as models.<name>, and
    importing it again would register its names twice."""
    path = os.path.realpath(path)
    if any(os.path.realpath(getattr(module, "__file__", None) or "") == path
           for module in list(sys.modules.values())):
        return
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(path))
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]  # a failed import is not an imported file
        raise


def _lookup(table, kind, flag, name):
    load_plugins()
    if name not in table:
        raise RegistryError(f"unknown {kind} '{name}' (known: {', '.join(sorted(table))}): pass one "
                            f"of them as {flag}, or set {PLUGINS_VARIABLE} to the file that registers it")
    return table[name]


def get_architecture(name):
    return _lookup(ARCHITECTURES, "architecture", "--arch", name)


def get_act_binarizer(name):
    return _lookup(ACT_BINARIZERS, "activation binarizer", "--act_binarizer", name)


def get_weight_binarizer(name):
    return _lookup(WEIGHT_BINARIZERS, "weight binarizer", "--weight_binarizer", name)
