"""Architectures and binarizers by name, and the plugins that add more.

An architecture is a function ``build(num_classes, binary_weights)`` returning a module whose
classifier is a ``Linear`` named ``fc``, built from the blocks of models/layers.py (its binary
convolutions are ``BinaryConv2d``, its activation binarizers ``BinaryActivation``), registered with
``@register_architecture(name, title, downsampling)``. A binarizer is a differentiable function of
one tensor, registered with ``@register_act_binarizer(name)`` or ``@register_weight_binarizer(name)``.

``BNN_PLUGINS`` names more modules to import before any lookup: Python files or importable module
names, separated by ``os.pathsep`` (``:`` on Linux). A file is imported with its own folder on
``sys.path``. Every entry point looks names up here, so a plugin's architecture or binarizer works
with every command once the variable is set.
"""
import importlib
import importlib.util
import os
import sys
import traceback
from dataclasses import asdict, dataclass

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
    """
    name: str
    title: str
    build: object
    downsampling: int
    reported_costs: dict | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Everything besides the weights and the step that rebuilding a model needs; saved in every
    checkpoint. Files that predate the names hold the defaults (ReActNet-A, the published binarizers)."""
    arch: str = "reactnet_a"
    act_binarizer: str = "polynomial"
    weight_binarizer: str = "scaled_sign"

    def as_dict(self):
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, checkpoint):
        """The spec a checkpoint dict records; the defaults for what it does not record."""
        return cls(**{key: checkpoint[key] for key in asdict(cls()) if isinstance(checkpoint.get(key), str)})


ARCHITECTURES = {}
ACT_BINARIZERS = {}
WEIGHT_BINARIZERS = {}
_loaded_plugins = []


def _register(table, kind, name, value):
    if name in table:
        raise RegistryError(f"{kind} '{name}' is registered twice")
    table[name] = value


def register_architecture(name, title, downsampling=32, reported_costs=None):
    """Decorator registering ``build(num_classes, binary_weights)`` under ``name`` (see Architecture)."""
    def decorate(build):
        _register(ARCHITECTURES, "architecture", name,
                  Architecture(name, title, build, downsampling, reported_costs))
        return build
    return decorate


def register_act_binarizer(name):
    """Decorator registering an activation binarizer (a function of the pre-binarization tensor)."""
    def decorate(function):
        _register(ACT_BINARIZERS, "activation binarizer", name, function)
        return function
    return decorate


def register_weight_binarizer(name):
    """Decorator registering a weight binarizer (a function of a conv's latent weight tensor)."""
    def decorate(function):
        _register(WEIGHT_BINARIZERS, "weight binarizer", name, function)
        return function
    return decorate


def load_plugins():
    """Imports the modules ``BNN_PLUGINS`` names, once each."""
    for entry in filter(None, os.environ.get(PLUGINS_VARIABLE, "").split(os.pathsep)):
        if entry in _loaded_plugins:
            continue
        _loaded_plugins.append(entry)
        try:
            if entry.endswith(".py"):
                path = os.path.abspath(entry)
                sys.path.insert(0, os.path.dirname(path))
                name = os.path.splitext(os.path.basename(path))[0]
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(entry)
        except Exception as e:  # whatever a plugin raises while it is imported is the plugin's
            raise RegistryError(f"cannot import the plugin '{entry}' named in {PLUGINS_VARIABLE} "
                                f"({where_it_failed(e)}): fix or remove it") from None


def where_it_failed(error):
    """``error`` in one line, with the file and line it was raised at."""
    if isinstance(error, SyntaxError):
        return f"{type(error).__name__}: {error.msg} at {error.filename} line {error.lineno}"
    message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    frames = traceback.extract_tb(error.__traceback__)
    if frames:
        message += f" at {frames[-1].filename} line {frames[-1].lineno}"
    return message


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


def set_binarizers(model, act_binarizer, weight_binarizer):
    """Makes every BinaryActivation and BinaryConv2d of ``model`` use the named binarizers, in place."""
    from .layers import BinaryActivation, BinaryConv2d  # here: layers -> binarize -> this module
    act, weight = get_act_binarizer(act_binarizer), get_weight_binarizer(weight_binarizer)
    for module in model.modules():
        if isinstance(module, BinaryActivation):
            module.binarizer = act
        elif isinstance(module, BinaryConv2d):
            module.weight_binarizer = weight
    return model


def build_model(spec, num_classes, binary_weights):
    """The architecture ``spec.arch`` with ``spec``'s binarizers; ``model.spec`` records ``spec``.

    Args:
        spec: a ModelSpec.
        num_classes: classifier outputs.
        binary_weights: False for step 1 (real weights), True for step 2.
    """
    model = get_architecture(spec.arch).build(num_classes, binary_weights)
    set_binarizers(model, spec.act_binarizer, spec.weight_binarizer)
    model.spec = spec
    return model
