"""Command-line pieces shared by the training steps, evaluate.py and the tools."""
import argparse
import math
import os

import torch

from models.checkpoint import model_from_checkpoint
from models.registry import ACT_BINARIZERS, ARCHITECTURES, WEIGHT_BINARIZERS, get_architecture
from models.spec import INTERPOLATIONS, RESIZE_ROUNDINGS, RunSpec

from .data import CPU_DECODE_SHARE
from .errors import UserError
from .pipeline import JPEG_DECODERS
from .recipe import RECIPES
from .signals import DATA_TIMEOUT


# Unreadable images are skipped; more than this share of the images read so far in an epoch stops it.
MAX_UNREADABLE_SHARE = 0.5
# The largest --image_size taken: 18 times the paper's 224 in width, and tools.summary's single
# forward pass at 4096 already peaks at 5.6 GB on a CPU.
MAX_IMAGE_SIZE = 4096
# ...once they are more than this many. Early in an epoch a share is noise (one bad file among the
# first images read is most of them), and ten files cost nothing to skip, while a folder that is
# mostly broken still stops within its first few dozen images at the default share.
UNREADABLE_FLOOR = 10


# The largest float32: weights, optimizer state and every computation are float32, so a setting
# beyond it overflows in the first update (PyTorch's optimizers then raise, or the weights turn infinite).
FLOAT32_MAX = 3.4028234663852886e38


def finite_float(text):
    """A float flag's value: NaN and infinity pass float() but no setting means them (an infinite
    learning rate turns every weight into NaN at the first update), nor a value beyond float32's range."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number: pass a finite value")
    if abs(value) > FLOAT32_MAX:
        raise argparse.ArgumentTypeError(f"{text} is beyond float32's range (the precision of the "
                                         f"weights and every computation): pass at most {FLOAT32_MAX:.4g}")
    return value


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits with status 2, and every
    ``type=float`` flag refuses NaN, infinity and values beyond float32."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("type", float, finite_float)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_device_flag(parser):
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available")


def resolve_device(name):
    """The torch.device for ``--device``; a UserError if CUDA is asked for but absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no GPU: pass --device cpu or check the driver")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def add_workers_flag(parser):
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="data-loading workers per process (default: from the CPU count)")


def resolve_workers(workers, processes_per_node=1):
    """``--workers`` checked, or by default the CPUs this process may use, shared by the node's
    processes, one left for the training loop itself, at most 16."""
    if workers is not None:
        require_at_least(0, {"--workers": workers})
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus // max(1, processes_per_node) - 1))


def require_positive(flags):
    """A UserError naming the first flag whose value is not > 0.

    Args:
        flags: ``{"--flag": value}``.
    """
    for flag, value in flags.items():
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")


# The largest count or size taken (batch, epochs, iterations): Python's sequences and torch's int64
# tensors stop there.
MAX_COUNT = 2**63 - 1


def require_count(flags):
    """A UserError naming the first flag in ``{"--flag": value}`` that is beyond MAX_COUNT."""
    for flag, value in flags.items():
        if value > MAX_COUNT:
            raise UserError(f"{flag} {value} is beyond the largest count taken (2**63 - 1): pass a smaller value")


def require_at_least(minimum, flags):
    """A UserError naming the first flag in ``{"--flag": value}`` whose value is below ``minimum``."""
    for flag, value in flags.items():
        if value < minimum:
            raise UserError(f"{flag} must be at least {minimum}, got {value}")


def require_seed(seed):
    """A UserError unless ``--seed`` is one that torch's generators take: 0 <= seed < 2**64."""
    if not 0 <= seed < 2**64:
        raise UserError(f"--seed must be between 0 and 2**64 - 1, got {seed}")


def add_unreadable_flag(parser):
    parser.add_argument("--max_unreadable_share", type=float, default=MAX_UNREADABLE_SHARE,
                        help=f"unreadable images are skipped with a warning and counted; stop when "
                             f"more than this share of the images read so far in the epoch (summed "
                             f"over processes, not per batch) is unreadable and more than "
                             f"{UNREADABLE_FLOOR} are; 0 stops at the first")


def add_data_timeout_flag(parser, saves=False):
    """``--data_timeout``; ``saves``: the command saves its last finished iteration first."""
    then = ", after saving the last finished iteration" if saves else ""
    parser.add_argument("--data_timeout", type=float, default=DATA_TIMEOUT,
                        help=f"seconds a batch may take to come from the data loader before the run ends "
                             f"with an error naming the stall{then} (a loader worker stuck in a read "
                             f"from a hung network mount would hold it forever); 0 waits forever")


def add_cpu_decode_share_flag(parser):
    parser.add_argument("--cpu_decode_share", type=float, default=CPU_DECODE_SHARE,
                        help="with --data_backend gpu: the share of the JPEG files decoded by PIL in "
                             "the loader's workers instead of on the device, chosen per sample from "
                             "(seed, epoch, position) (pixels as with pil; see docs/data.md)")


def add_jpeg_decoder_flag(parser):
    parser.add_argument("--jpeg_decoder", choices=list(JPEG_DECODERS), default=None,
                        help=f"with --data_backend gpu: the library that decodes JPEG files on the "
                             f"device (default: the first of {', '.join(JPEG_DECODERS)} that loads; "
                             f"the one chosen is printed and recorded in args.json)")


def require_share(flag, value):
    """A UserError unless ``0 <= value < 1``."""
    if not 0 <= value < 1:
        raise UserError(f"{flag} must be in [0, 1), got {value}")


def require_image_size(size, flag="--image_size", arch=RunSpec.arch):
    """A UserError if the architecture ``arch`` cannot take ``size`` x ``size`` images, or no memory could."""
    require_image_size_in_memory(size, flag)
    architecture = get_architecture(arch)
    if size < architecture.downsampling:
        raise UserError(f"{flag} {size} is too small: {architecture.title} downsamples by "
                        f"{architecture.downsampling}, use at least {architecture.downsampling}")


def require_image_size_in_memory(size, flag="--image_size"):
    """A UserError if ``size`` is beyond what any architecture's activations fit in memory at; it
    needs no model, so a tool checks it before reading one."""
    if size > MAX_IMAGE_SIZE:
        raise UserError(f"{flag} {size} is too large: use at most {MAX_IMAGE_SIZE} (one image of "
                        f"that size already needs gigabytes of activations)")


# The RunSpec fields (models/spec.py) a command may take as flags: (argparse keywords, help).
SPEC_FLAGS = {
    "arch": ({}, "architecture registered in models/ (built in: {arch}; more through BNN_PLUGINS)"),
    "act_binarizer": ({}, "activation binarizer (built in: {act})"),
    "weight_binarizer": ({}, "weight binarizer of step 2 (built in: {weight})"),
    "step": ({"type": int, "choices": [1, 2]}, "1: binary activations and real weights, 2: binary "
                                               "weights too"),
    "num_classes": ({"type": int}, "classifier outputs"),
    "image_size": ({"type": int}, "side of the square images the network takes, in training and "
                                  "evaluation"),
    "crop_pct": ({"type": float}, "evaluation resizes the shorter side to image_size / crop_pct "
                                  "(rounded by --resize_rounding), then centre-crops image_size"),
    "resize_rounding": ({"choices": sorted(RESIZE_ROUNDINGS)}, "round (the published Resize(256) at 224) "
                                                              "or floor (timm's)"),
    "interpolation": ({"choices": INTERPOLATIONS}, "of every resize, training's random crop included"),
    "mean": ({"type": float, "nargs": 3, "metavar": ("R", "G", "B")},
             "normalisation: subtracted from the pixels scaled to [0, 1]"),
    "std": ({"type": float, "nargs": 3, "metavar": ("R", "G", "B")},
            "normalisation: what the pixels are then divided by"),
    "recipe": ({"choices": sorted(RECIPES)}, "training recipe whose values the training flags default "
                                             "to (utils/recipe.py)"),
}
# What each command reads these values from when a flag does not name them.
FROM_CHECKPOINT = "the checkpoint's"


def add_spec_flags(parser, names, source=FROM_CHECKPOINT):
    """Adds the RunSpec flags ``names`` to ``parser``, in SPEC_FLAGS' order. Each defaults to None
    (not given): the value then comes from ``source`` (say, the checkpoint's; None for a command
    that reads none), else from the architecture's defaults, else RunSpec's (the published values)."""
    sources = ([source] if source else []) + ["the architecture's", "the published value"]
    group = parser.add_argument_group(f"what the run computes (default: {', else '.join(sources)})")
    known = {"arch": ", ".join(sorted(ARCHITECTURES)), "act": ", ".join(sorted(ACT_BINARIZERS)),
             "weight": ", ".join(sorted(WEIGHT_BINARIZERS))}
    for name, (keywords, text) in SPEC_FLAGS.items():
        if name in names:
            group.add_argument(f"--{name}", default=None, **keywords,
                               help=f"{text.format(**known)} (default: {default_text(name)})")


def default_text(name):
    """RunSpec's default of field ``name``, and each registered architecture's own, as help shows them."""
    own = [f"{arch}: {shown_value(architecture.defaults[name])}"
           for arch, architecture in sorted(ARCHITECTURES.items()) if name in architecture.defaults]
    return shown_value(getattr(RunSpec, name)) + (f"; {', '.join(own)}" if own else "")


def given_spec(args):
    """``{field: value}`` of the RunSpec flags in ``args`` (None where not given)."""
    return {name: getattr(args, name) for name in SPEC_FLAGS if hasattr(args, name)}


def describe_overrides(overrides):
    """One line per flag that overrides what the checkpoint recorded."""
    return [f"=> --{name} {shown_value(new)} overrides the checkpoint's {shown_value(old)}"
            for name, (old, new) in overrides.items()]


def shown_value(value):
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def require_spec(spec):
    """A UserError for a RunSpec no run can compute with (from flags or from a checkpoint)."""
    require_image_size(spec.image_size, arch=spec.arch)
    if not 0 < spec.crop_pct <= 1:
        raise UserError(f"--crop_pct must be in (0, 1], got {spec.crop_pct}")
    if spec.interpolation not in INTERPOLATIONS:
        raise UserError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got {spec.interpolation}")
    if spec.resize_rounding not in RESIZE_ROUNDINGS:
        raise UserError(f"--resize_rounding must be one of {', '.join(sorted(RESIZE_ROUNDINGS))}, got "
                        f"{spec.resize_rounding}")
    if not all(value > 0 for value in spec.std):
        raise UserError(f"--std must be positive, got {shown_value(spec.std)}")


def model_for(args, log=print):
    """The model of ``args.checkpoint`` with the RunSpec flags of ``args`` applied (each override
    logged), its RunSpec checked by ``require_spec``."""
    model, overrides = model_from_checkpoint(args.checkpoint, given_spec(args))
    for line in describe_overrides(overrides):
        log(line)
    require_spec(model.spec)
    return model
