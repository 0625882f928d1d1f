"""Command-line pieces shared by the training steps, evaluate.py and the tools."""
import argparse
import math
import os

import torch

from models import ModelSpec
from models.registry import ACT_BINARIZERS, ARCHITECTURES, WEIGHT_BINARIZERS, get_architecture

from .data import CPU_DECODE_SHARE
from .errors import UserError
from .pipeline import JPEG_DECODERS


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


def require_image_size(size, flag="--image_size", arch=ModelSpec.arch):
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


def add_arch_flag(parser, default=ModelSpec.arch, help_default=None):
    parser.add_argument("--arch", default=default,
                        help=f"architecture registered in models/ (built in: {', '.join(sorted(ARCHITECTURES))}; "
                             f"more through BNN_PLUGINS) (default: {help_default or default})")


def add_model_flags(parser):
    """``--arch``, ``--act_binarizer``, ``--weight_binarizer`` of the train scripts. They default to
    None: resolved from the checkpoint when there is one to continue from, else to ModelSpec's."""
    from_checkpoint = "from the checkpoint resumed or started from, else {}"
    add_arch_flag(parser, None, from_checkpoint.format(ModelSpec.arch))
    parser.add_argument("--act_binarizer", default=None,
                        help=f"activation binarizer (built in: {', '.join(sorted(ACT_BINARIZERS))}; "
                             f"default: {from_checkpoint.format(ModelSpec.act_binarizer)})")
    parser.add_argument("--weight_binarizer", default=None,
                        help=f"weight binarizer of step 2 (built in: {', '.join(sorted(WEIGHT_BINARIZERS))}; "
                             f"default: {from_checkpoint.format(ModelSpec.weight_binarizer)})")
