"""Reading model weights from our checkpoints and from the authors' released ReActNet-A and BNext files."""
import re

import torch

from models.registry import RegistryError, get_architecture
from models.spec import RunSpec, build_model, recorded_fields, resolve

# Prefixes that wrappers add to every key: nn.DataParallel / DDP, and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


def read_checkpoint(path):
    """Loads a checkpoint file as a dict without executing any pickled code.

    Raises:
        CheckpointError: the file is missing, unreadable, or not a dict saved by ``torch.save``.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint file at {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a checkpoint file") from None
    except PermissionError:
        raise CheckpointError(f"no permission to read {path}") from None
    except Exception as e:  # garbage makes the unpickler fail in many ways; all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: "
                              f"{refusal_reason(e)[:300]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state_dict")
    return obj


def refusal_reason(error):
    """Why torch.load(weights_only=True) refused a file, in a few words, from its ``error``.

    torch's own text advises loading with ``weights_only=False``, which would run whatever the file
    holds: that advice is never passed on.
    """
    message = str(error)
    global_name = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", message)
    if global_name:
        return (f"it holds Python code that loading would run (the global {global_name.group(1)}), "
                f"so it is never loaded: use a file of tensors and plain containers only")
    unpickler = re.search(r"WeightsUnpickler error:\s*(.*)", message)
    if unpickler:
        return f"its contents are not what torch.save writes: {unpickler.group(1).strip()}"
    paragraphs = [p.strip() for p in message.split("\n\n") if p.strip()]
    own = [p for p in paragraphs if "weights_only" not in p and "documentation of torch.load" not in p]
    if not own:
        return type(error).__name__
    return own[0].splitlines()[0]


def extract_state_dict(checkpoint, path="checkpoint"):
    """The state_dict inside ``checkpoint`` with wrapper prefixes removed.

    Accepts a dict with a ``state_dict`` entry (ours and the released files) or a bare state_dict.
    """
    state_dict = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state_dict, dict) or not state_dict or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        raise CheckpointError(f"{path} has no state_dict of tensors (keys: {_preview(checkpoint)})")
    return {strip_wrapper_prefixes(k): v for k, v in state_dict.items()}


def classes_in(checkpoint, path="checkpoint"):
    """Output classes of the fc layer stored in ``checkpoint`` (a dict from read_checkpoint)."""
    weight = extract_state_dict(checkpoint, path).get("fc.weight")
    if weight is None:
        raise CheckpointError(f"{path} has no fc.weight: it is not a checkpoint of a classifier built here")
    return weight.shape[0]


def strip_wrapper_prefixes(key):
    """``module._orig_mod.feature.0...`` -> ``feature.0...``."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def convert_flat_binary_weights(state_dict, expected):
    """Maps ReActNet's released ``*.weights`` of shape (out*in*k*k, 1) to ``*.weight`` (out, in, k, k)."""
    converted = {}
    for key, value in state_dict.items():
        if key.endswith(".weights") and key[:-1] in expected and key[:-1] not in state_dict:
            shape = expected[key[:-1]].shape
            if value.numel() == shape.numel():
                key, value = key[:-1], value.reshape(shape)
        converted[key] = value
    return converted


def check_fits(state_dict, expected, path, title="ReActNet-A"):
    """Raises CheckpointError naming every missing, unexpected and mis-shaped key."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                 for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if keys:
            shown = "; ".join(keys[:4]) + (f"; ... {len(keys) - 4} more" if len(keys) > 4 else "")
            problems.append(f"{len(keys)} {label} ({shown})")
    if problems:
        raise CheckpointError(f"{path} does not fit this {title}: " + ", ".join(problems))


def load_weights(model, checkpoint, path="checkpoint"):
    """Loads the weights of an already read checkpoint dict into ``model``, strictly.

    Raises:
        CheckpointError: keys missing, unexpected or of another shape (all of them named).
    """
    expected = model.state_dict()
    state_dict = convert_flat_binary_weights(extract_state_dict(checkpoint, path), expected)
    check_fits(state_dict, expected, path, title_of(model))
    model.load_state_dict(state_dict, strict=True)


def load_checkpoint(model, path):
    """Loads weights into ``model`` strictly from any supported checkpoint file.

    Supported: checkpoints written by this repository; the AdamBNN, ReActNet and BNext released
    files (``nn.DataParallel`` ``module.`` prefixes, ReActNet's flat ``.weights`` tensors, BNext's
    ``temp`` list and optimizer state beside its ``state_dict``); a bare state_dict. Files are read
    with ``weights_only=True``.

    Args:
        model: a model (unwrapped) whose state_dict the file must match exactly.
        path: the checkpoint file.

    Returns:
        The whole checkpoint dict, for its metadata (``epoch``, ``best_top1_acc``, ``step``...).

    Raises:
        CheckpointError: unreadable file, or keys missing, unexpected or of another shape.
    """
    checkpoint = read_checkpoint(path)
    load_weights(model, checkpoint, path)
    return checkpoint


def title_of(model):
    """How reports name ``model``: its architecture's title (ReActNet-A when built without a spec)."""
    return get_architecture(getattr(model, "spec", RunSpec()).arch).title


def model_from_checkpoint(path, given=None):
    """Builds the model that a checkpoint file holds and loads its weights.

    The RunSpec is what the checkpoint recorded (models/spec.py), the flags ``given`` winning;
    the number of classes is that of its fc layer. Files without a spec (the released ones) hold
    a step-2 ReActNet-A with the published values.

    Args:
        path: any file ``load_checkpoint`` accepts.
        given: ``{RunSpec field: value}`` of the flags given explicitly (None: not given).

    Returns:
        ``(model, overrides)``: the model on the CPU in training mode, ``model.spec`` its RunSpec,
        ``model.classes`` the class names the checkpoint records in label order (None where it
        records none, as the released files and older checkpoints); ``overrides`` as
        ``models.spec.resolve`` returns them.
    """
    checkpoint = read_checkpoint(path)
    recorded = dict(recorded_fields(checkpoint), num_classes=classes_in(checkpoint, path))
    try:
        spec, overrides = resolve(given or {}, recorded)
        model = build_model(spec)
    except RegistryError as e:
        raise CheckpointError(f"{path}: {e}") from None
    try:
        load_weights(model, checkpoint, path)
    except CheckpointError as e:
        if "arch" not in recorded and not (given or {}).get("arch"):  # most likely a released file of another one
            raise CheckpointError(f"{e}; a file of another architecture needs --arch") from None
        raise
    classes = checkpoint.get("classes")
    model.classes = list(classes) if isinstance(classes, (list, tuple)) else None
    return model, overrides


def _preview(d, limit=6):
    keys = [str(k) for k in d][:limit]
    return ", ".join(keys) + (", ..." if len(d) > limit else "") if keys else "none"
