"""Runs a step-2 ReActNet-A as a 1-bit network: export to Larq Compute Engine, verify, time.

    python -m tools.export_lce --checkpoint step2/models/model_best.pth.tar --data /data/imagenet

Writes OUT/model.tflite (every binary conv an ``LceBconv2d`` with bit-packed weights and
activations), OUT/report.json (``verified`` and the reasons it is not) and OUT/lce.log. LCE needs
TensorFlow and numpy < 2, so it lives in a virtual environment of its own (``--lce_env``, created
from tools/lce/requirements.txt on first use and reused while that file is unchanged); this
process writes weights and inputs to a work folder and tools/lce/convert.py, run by that
environment's Python, reads them and serves the validation images batch by batch.

The flatbuffer binarizes a latent weight of exactly 0 to +1 (PyTorch's sign gives 0; a bit has no
0); the model it is compared with reads such weights as +1 too (``zeros_read_as_plus_one``).
Verification checks the flatbuffers, not the float model:
  1. op census: every binary conv is an LceBconv2d with bit-packed input and filter, and the
     stem is the only CONV_2D;
  2. the stem, each block and the head, converted side by side into one more flatbuffer and fed
     PyTorch's own input of that part, match PyTorch (with the flatbuffer's weights) within the
     tolerance, except at output positions that a pre-sign value close enough to 0 to flip
     reaches (``near_zero_positions``); both of LCE's optimized kernels give the same outputs;
  3. model.tflite on every validation image (evaluate.py's model, transforms and order): its
     logits equal, bit for bit, those of the same chain with every part's output exposed (the
     probe), and each part of the probe, fed LCE's own output of the part before it, matches
     PyTorch's part on that input as in 2;
  4. the weights given to LCE (``as_exported``) compute, part by part, what the model itself
     computes on its own run;
  5. each image's outputs follow the model's own run, part after part, within the tolerance
     until the first part where near-zero signs flip: every difference in logits, and so every
     top-1 disagreement, is one that sign flips account for;
  6. no value anywhere is NaN or infinite, and at least MIN_IMAGES images of MIN_CLASSES classes
     were compared.
Any value that is not finite fails the check it appears in. The converted model stays
OUT/model.tflite.unverified until the checks end, then becomes model.tflite (verified) or
model.rejected.tflite, is read back, and its sha256 must be that of the bytes LCE ran. Then
batch-1 latency: LCE's two kernels against PyTorch with weights binarised once and against the
published forward (weights binarised at every call).
"""
import argparse
import contextlib
import copy
import fcntl
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.binarize import binarize_weight  # noqa: E402
from models.layers import binary_convs, set_binarizers  # noqa: E402
from models.reactnet import BasicBlock, Stem  # noqa: E402
from models.registry import get_architecture  # noqa: E402
from tools.lce.timing import latency_ms  # noqa: E402
from utils.cli import (OneLineErrorParser, add_spec_flags, add_unreadable_flag, add_workers_flag,  # noqa: E402
                       model_for, require_at_least, require_count, require_positive, require_share,
                       resolve_workers)
from utils.data import make_loader, on_device, open_split  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.evaluation import UnreadableLimit  # noqa: E402
from utils.runtime import keep_freed_host_memory  # noqa: E402
from utils.training_flags import REPO_ROOT  # noqa: E402

REQUIREMENTS = os.path.join(REPO_ROOT, "tools", "lce", "requirements.txt")
STAMP = "requirements.sha256"  # in the environment: the hash of the requirements it was made from
MB = 1e6
# Per-part tolerance: |LCE - PyTorch| <= ATOL + RTOL * (the largest |PyTorch| of that channel).
# Relative to the channel, not to the value itself: LCE sums in another order (BatchNorm folded
# into an offset, residual adds), so float32 rounding scales with the large terms of a channel and
# a value that cancels to near 0 keeps their absolute error (a trained demo model: 2.0e-4 at an
# output of 0.24 in a channel reaching 19.7, 1e-5 of that channel's scale).
ATOL, RTOL = 1e-4, 1e-4
# LCE 0.16's binary conv kernels (both) get zero padding wrong when the input is smaller than the
# 3x3 kernel (every output differed at 2x2 and 1x1): ReActNet-A's last stage is image_size / 32
# wide, so at least 3 there.
MIN_EXPORT_SIZE = 96
# A value before a block's second sign within this many times the rounding error measured on the
# block's outputs may flip (near_zero_positions). On a trained model (10 digits, 96 px, 4 images)
# every flip found was within 0.1 times it, and 4 times it reached at most 4% of a block's positions.
SIGN_MARGIN = 4
# A part's comparison leaves out the positions a near-zero pre-sign value reaches; when they are
# more than this share of its positions, the comparison rests on fewer values than it leaves out
# and is refused. (One near-zero first sign alone reaches 9 of the 36 positions of a 6x6 map.)
MAX_EXCUSED_SHARE = 0.5
# The fewest images, and of distinct classes among their labels (or every class of val/ when it has
# fewer), on which an export can be verified: a defect that touches 3% of the images escapes 100 of
# them with a probability under 5%, and images of several classes exercise several paths.
MIN_IMAGES, MIN_CLASSES = 100, 10
# The environment is stamped as ready only once its Python imports this.
LCE_MODULE = "larq_compute_engine"
# How the LCE environment's Python runs the LCE side, from the repository root.
CONVERTER = ["-m", "tools.lce.convert"]
# The converted model, in --out until the checks pass (then model.tflite, else REJECTED).
CANDIDATE, REJECTED = "model.tflite.unverified", "model.rejected.tflite"


def lce_python(env):
    """The Python of the LCE environment at ``env``, created or brought up to date first.

    An environment whose stamp matches tools/lce/requirements.txt is reused as it is (no network,
    no pip); otherwise it is rebuilt from scratch, and stamped only once its Python imports LCE.
    Another process checking or building the same environment is waited for (``environment_lock``).

    Raises:
        UserError: ``env`` is something other than a virtual environment, or the install failed.
    """
    python = os.path.join(env, "bin", "python")
    with open(REQUIREMENTS, "rb") as f:
        wanted = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(env, STAMP)
    with environment_lock(env):
        if os.path.isfile(python) and os.path.isfile(stamp):
            with open(stamp) as f:
                if f.read().strip() == wanted:
                    return python
        # venv --clear empties the folder: only ever do that to a virtual environment.
        if os.path.exists(env) and not (os.path.isdir(env) and (
                not os.listdir(env) or os.path.isfile(os.path.join(env, "pyvenv.cfg")))):
            raise UserError(f"--lce_env {env} exists and is not a virtual environment: pass another "
                            f"folder (it is created there)")
        print(f"=> installing the LCE environment into {env} from {REQUIREMENTS} (about 2.2 GB, "
              f"a minute or two)", flush=True)
        _run_install([sys.executable, "-m", "venv", "--clear", env], f"create a virtual environment at {env}")
        _run_install([python, "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", REQUIREMENTS],
                     f"install {REQUIREMENTS} into {env}",
                     " (TensorFlow 2.16 needs Python 3.9 to 3.12 and access to the package index)")
        _run_install([python, "-c", f"import {LCE_MODULE}"], f"import {LCE_MODULE} in {env}")
        with open(stamp + ".tmp", "w") as f:
            f.write(wanted + "\n")
        os.replace(stamp + ".tmp", stamp)
    return python


@contextlib.contextmanager
def environment_lock(env):
    """Holds ``env``.lock, beside the environment (``venv --clear`` empties the folder itself), so
    that one process at a time checks or builds it. The file stays: removing it would let a
    waiting process lock a file that a newcomer no longer sees."""
    path = os.path.normpath(env) + ".lock"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot create the lock file {path} of --lce_env {env} ({e.strerror}): pass "
                        f"another folder") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"=> waiting for another process that is checking or installing {env}", flush=True)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_install(command, what, hint=""):
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as e:
        raise UserError(f"could not {what} ({e.strerror})") from None
    if result.returncode != 0:
        lines = [line for line in (result.stderr + result.stdout).splitlines()
                 if line.strip() and not line.startswith("WARNING")]
        reason = lines[-1].strip() if lines else f"exit status {result.returncode}"
        raise UserError(f"could not {what}: {reason[:300]}{hint}")


def as_exported(module):
    """A copy of ``module`` whose binary convs hold the flatbuffer's weights as plain weights:
    ``alpha * sign(W)``, binarised once, with a latent weight of exactly 0 taken as +1 as LCE
    binarizes it."""
    module = copy.deepcopy(module)
    with torch.no_grad():
        for _, conv in binary_convs(module):
            binarized = binarize_weight(conv.weight)
            alpha = binarized.abs().amax(dim=(1, 2, 3), keepdim=True)
            conv.weight.copy_(torch.where(conv.weight == 0, alpha, binarized))
            conv.binary_weights = False
    return module


def zero_weights(module):
    """Latent weights of the binary convs that are exactly 0."""
    return sum(int((conv.weight == 0).sum()) for _, conv in binary_convs(module))


def zeros_read_as_plus_one(model):
    """``model`` itself, or, when some latent binary weights are exactly 0, a copy where they are
    the smallest positive float32: the model's own weight binarizer then gives them ``+alpha``, as
    LCE's bits do, and ``alpha``, a mean of |W|, does not see the change. The network the export is
    compared with, computed by the model's own code rather than by ``as_exported``."""
    if not zero_weights(model):
        return model
    model = copy.deepcopy(model)
    with torch.no_grad():
        for _, conv in binary_convs(model):
            conv.weight.masked_fill_(conv.weight == 0, torch.finfo(conv.weight.dtype).tiny)
    return model


def model_parts(model):
    """``(state_dict prefix, module)`` of ReActNet-A's parts in forward order: the stem, the 13
    blocks, then the head from global pooling on."""
    parts = [(f"feature.{i}.", m) for i, m in enumerate(model.feature)]
    return parts + [("", torch.nn.Sequential(model.pool1, torch.nn.Flatten(), model.fc))]


def part_name(prefix):
    return prefix.rstrip(".") or "head"


def numpy_state(module):
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def batchnorm_eps(module):
    (eps,) = {m.eps for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    return eps


def nhwc(x):
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def as_maps(x):
    """(N, C) logits as (N, C, 1, 1), so that every part's output compares as feature maps."""
    return x if x.dim() == 4 else x[:, :, None, None]


def channel_tolerance(x):
    """ATOL + RTOL * the largest finite |x| of each channel of each image, shaped to broadcast over
    ``x`` (per image, so that it does not depend on which images share a batch)."""
    return ATOL + RTOL * torch.where(torch.isfinite(x), x, 0).abs().amax(dim=(2, 3), keepdim=True)


def near_zero_positions(block, sign_inputs, eps, expected, actual, input_drift=0):
    """(N, H, W) output positions of ``block`` that a pre-sign value close enough to 0 to flip reaches.

    The first sign acts on the block's input plus a shift, which LCE computes exactly as PyTorch
    (one float32 add of the same operands): the two may differ only at exact zeros, so values
    within ``eps`` of 0 are flagged; when the two sides' inputs differ by ``input_drift`` (per
    value), a value within ``eps`` plus that of 0 may have either sign. The second sign acts on a
    value that went through the 3x3 conv and its BatchNorm, which LCE folds into one multiply-add
    and sums in another order: there the two differ by the float32 rounding accumulated so far, so
    values within SIGN_MARGIN times each image's rounding error (``measured_error`` of the block's
    outputs ``expected`` and ``actual`` away from the first sign's flags), or within ``eps``, of 0
    are flagged. The 3x3 conv carries a sign of its input to every output whose window covers it;
    the 1x1 conv's sign acts on its own position only. Every channel of a flagged position is
    flagged.
    """
    first, second = sign_inputs
    first = (first.abs() <= eps + input_drift).any(dim=1, keepdim=True).float()
    reached = F.max_pool2d(first, 3, block.stride, padding=1).squeeze(1) > 0
    error = measured_error(expected, actual, reached)
    budget = torch.clamp(SIGN_MARGIN * error, min=eps).view(-1, 1, 1, 1)
    return reached | (second.abs() <= budget).any(dim=1)


def measured_error(expected, actual, excluded):
    """Each image's largest |LCE - PyTorch| over the output positions where no sign flipped: those
    that every channel keeps within the tolerance (a flipped sign moves most channels of a position
    by far more; a value that is not finite is never within it) and that are not ``excluded``. The
    float32 rounding that separates the two sides."""
    diff = (actual - expected).abs()
    flipped = (~(diff <= channel_tolerance(expected))).any(dim=1, keepdim=True) | excluded.unsqueeze(1)
    return diff.masked_fill(flipped, 0).flatten(1).amax(dim=1)


@torch.no_grad()
def part_reference(part, x):
    """PyTorch's output of ``part`` on ``x`` and the inputs of its two signs (None outside the
    blocks, which alone binarize)."""
    if not isinstance(part, BasicBlock):
        return as_maps(part(x)), None
    sign_inputs = []
    handle = part.binary_activation.register_forward_pre_hook(lambda m, args: sign_inputs.append(args[0]))
    try:
        y = part(x)
    finally:
        handle.remove()
    return y, sign_inputs


def differences(expected, actual, near_zero):
    """``|actual - expected|`` and, per value, whether it is outside the tolerance, whether it is
    not finite (on either side; such a value is always outside) and whether it is at one of the
    ``near_zero`` positions."""
    diff = (actual - expected).abs()
    nonfinite = ~(torch.isfinite(actual) & torch.isfinite(expected))
    outside = ~(diff <= channel_tolerance(expected)) | nonfinite
    return diff, outside, nonfinite, near_zero.unsqueeze(1).expand_as(diff)


def compare(expected, actual, near_zero):
    """How far LCE's output of a part is from PyTorch's, away from the ``near_zero`` positions.
    A value that is not finite is counted as such and never excused."""
    diff, outside, nonfinite, flagged = differences(expected, actual, near_zero)
    kept = ~flagged & ~nonfinite
    return {"max_diff": float(diff[kept].max()) if kept.any() else 0.0,
            "positions": near_zero.numel(),
            "near_zero_positions": int(near_zero.sum()),
            "differing_positions": int(outside.any(dim=1).sum()),
            "unexplained": int((outside & kept).sum()),
            "nonfinite": int(nonfinite.sum())}


def near_zero_of(part, sign_inputs, sign_eps, expected, actual, input_drift=0):
    """``near_zero_positions`` of a block; none for the stem and the head, which do not binarize."""
    if sign_inputs is None:
        return torch.zeros(len(expected), *expected.shape[2:], dtype=torch.bool)
    return near_zero_positions(part, sign_inputs, sign_eps, expected, actual, input_drift)


def part_spec(prefix, part, x):
    """What tools/lce/convert.py needs to rebuild ``part`` for inputs shaped like ``x``."""
    spec = {"prefix": prefix, "input_shape": list(x.shape[2:]) + [x.shape[1]]}
    if isinstance(part, BasicBlock):
        return dict(spec, kind="block", stride=part.stride, widening=part.widening)
    return dict(spec, kind="stem" if isinstance(part, Stem) else "head")


class LceSide:
    """tools/lce/convert.py running in the LCE environment on the work files written here.

    It converts and runs ``parts.tflite`` on ``part_inputs`` at once; with ``spec["full"]`` it then
    converts ``model.tflite`` and its probe and runs them on each batch given to ``run``, so that
    no more than one batch of images and of the probe's outputs is ever on disk. Its output goes
    to the file ``log``.

    Raises (any method):
        UserError: the LCE side failed.
    """

    def __init__(self, python, work, spec, weights, part_inputs, log):
        self.work, self.log = work, log
        with open(os.path.join(work, "spec.json"), "w") as f:
            json.dump(spec, f)
        np.savez(os.path.join(work, "weights.npz"), **weights)
        np.savez(os.path.join(work, "part_inputs.npz"), **{str(i): x for i, x in enumerate(part_inputs)})
        answers, write_end = os.pipe()
        with open(log, "w") as f:
            self.process = subprocess.Popen([python, *CONVERTER, work, str(write_end)],
                                            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=f,
                                            stderr=subprocess.STDOUT, text=True, pass_fds=(write_end,))
        os.close(write_end)
        self.answers = os.fdopen(answers)

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        """Ends the LCE side if it is still running (when this side failed)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.answers.close()

    def run(self, images):
        """model.tflite's logits and the probe's output of each part on ``images`` (NHWC)."""
        name = os.path.join(self.work, "batch")
        np.save(name + ".npy", images)
        try:
            self.process.stdin.write("batch\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            self.failed()
        if not self.answers.readline():
            self.failed()
        with np.load(name + ".out.npz") as outputs:
            results = dict(outputs)
        os.remove(name + ".out.npz")
        return results.pop("logits"), [results[f"part_{i}"] for i in range(len(results))]

    def finish(self):
        """Waits for the LCE side to end; returns its report and the outputs of ``parts.tflite``."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        if self.process.wait() != 0:
            self.failed()
        with open(os.path.join(self.work, "report.json")) as f:
            report = json.load(f)
        with np.load(os.path.join(self.work, "outputs.npz")) as outputs:
            return report, dict(outputs)

    def failed(self):
        status = self.process.wait()
        with open(self.log) as f:
            lines = [line.strip() for line in f if line.strip()]
        raise UserError(f"the LCE conversion failed (exit status {status}): "
                        f"{lines[-1][:300] if lines else 'no output'}; its whole output is in {self.log}")


def start_lce(named_parts, inputs, python, work, spec=None, weights=None, log=None):
    """Starts the LCE side on parts of ReActNet-A, each to be fed PyTorch's input of that part.

    Args:
        named_parts: ``(state_dict prefix, module)`` pairs: BasicBlocks, the Stem, or the head
            (global pooling, flatten, fc), as ``as_exported`` returns them; ``weights`` holds
            their keys (default: taken from the modules alone).
        inputs: one NCHW float tensor per part.
        python, work: the LCE environment's Python and an empty work folder.
        spec, weights: the whole model's spec and weights, to convert and run it too.
        log: file for the LCE side's output (default: in ``work``).

    Returns:
        An ``LceSide``.
    """
    if weights is None:
        weights = numpy_state(torch.nn.ModuleDict({k.rstrip("."): m for k, m in named_parts}))
    spec = dict(spec or {"bn_eps": batchnorm_eps(named_parts[0][1]), "kernel": "indirect_bgemm"})
    spec["parts"] = [part_spec(prefix, part, x) for (prefix, part), x in zip(named_parts, inputs)]
    return LceSide(python, work, spec, weights, [nhwc(x) for x in inputs], log or os.path.join(work, "lce.log"))


def nchw(output):
    """An LCE output (NHWC maps or (N, C) logits) as PyTorch lays it out, contiguous: PyTorch's
    channels-last convolutions round differently (in a trained 512-channel block by 2e-4, as much
    as LCE does, enough to flip signs), and evaluate.py runs contiguous tensors."""
    output = torch.from_numpy(output)
    return output.permute(0, 3, 1, 2).contiguous() if output.dim() == 4 else output


def compare_parts(named_parts, inputs, outputs, sign_eps):
    """Each part's LCE output (``outputs``, as LCE lays them out) against PyTorch's on the same
    input; ``sign_eps`` as in ``near_zero_positions``."""
    comparisons = []
    for (prefix, part), x, actual in zip(named_parts, inputs, outputs):
        expected, sign_inputs = part_reference(part, x)
        actual = as_maps(nchw(actual))
        near_zero = near_zero_of(part, sign_inputs, sign_eps, expected, actual)
        comparisons.append(dict(compare(expected, actual, near_zero), part=part_name(prefix)))
    return comparisons


def verify_parts(named_parts, inputs, python, work, sign_eps):
    """Converts parts of ReActNet-A with LCE (``start_lce``), feeds each PyTorch's input of that
    part, and compares the outputs with PyTorch's.

    Returns:
        (per-part comparisons, LCE report, LCE outputs).
    """
    with start_lce(named_parts, inputs, python, work) as lce:
        report, outputs = lce.finish()
    comparisons = compare_parts(named_parts, inputs, [outputs[f"part_{i}"] for i in range(len(inputs))],
                                sign_eps)
    return comparisons, report, outputs


def merged(totals, comparisons):
    """Per-part comparisons of one more batch added to ``totals`` (None at first)."""
    if totals is None:
        return comparisons
    return [{key: max(t[key], c[key]) if key == "max_diff" else t[key] if key == "part" else t[key] + c[key]
             for key in t} for t, c in zip(totals, comparisons)]


@torch.no_grad()
def check_batch(parts, reference, images, lce_outputs, sign_eps):
    """The comparisons of one batch of images, part after part.

    Args:
        parts: ``model_parts`` of ``as_exported``'s copy, whose weights LCE was given.
        reference: ``model_parts`` of the model itself (``zeros_read_as_plus_one``).
        images: the batch (NCHW).
        lce_outputs: the probe's output of each part (NCHW; the logits as (N, C, 1, 1) maps).

    Returns:
        ``(chain, copy, own_run, departed_at, explained, logits)``. ``chain``: per part, the copy's
        part fed LCE's output of the part before it, against LCE's output. ``copy``: per part, the
        copy's part against the model's on the model's own run. ``own_run``: per part, the images
        whose LCE output first leaves the model's own run there beyond the tolerance, where only
        near-zero signs reach (``departed``) or elsewhere (``unexplained``), and the model's own
        values there that are not finite. Per image, ``departed_at``: the index of that part
        (``len(parts)`` if none) and ``explained``: whether near-zero signs account for it. The
        model's logits.
    """
    chain, copy_check, own_run = [], [], []
    departed_at = torch.full((len(images),), len(parts))
    explained = torch.ones(len(images), dtype=torch.bool)
    own_in = lce_in = images
    for index, ((prefix, part), (_, model_part), lce_out) in enumerate(zip(parts, reference, lce_outputs)):
        name = part_name(prefix)
        own_out, own_signs = part_reference(model_part, own_in)
        copy_out, _ = part_reference(part, own_in)
        near_zero = near_zero_of(model_part, own_signs, sign_eps, own_out, copy_out)
        copy_check.append(dict(compare(own_out, copy_out, near_zero), part=name))
        expected, signs = part_reference(part, lce_in)
        near_zero = near_zero_of(part, signs, sign_eps, expected, lce_out)
        chain.append(dict(compare(expected, lce_out, near_zero), part=name))
        # LCE's own input drifted from the model's by rounding (and by earlier flips, but an image
        # is followed only up to its first departure).
        near_zero = near_zero_of(model_part, own_signs, sign_eps, own_out, lce_out, (own_in - lce_in).abs())
        _, outside, nonfinite, flagged = differences(own_out, lce_out, near_zero)
        leaves = (departed_at == len(parts)) & outside.flatten(1).any(dim=1)
        unexplained = leaves & (outside & (~flagged | nonfinite)).flatten(1).any(dim=1)
        departed_at[leaves] = index
        explained[unexplained] = False
        own_run.append({"part": name, "departed": int((leaves & ~unexplained).sum()),
                        "unexplained": int(unexplained.sum()),
                        "nonfinite": int((~torch.isfinite(own_out)).sum())})
        own_in, lce_in = own_out, lce_out
    return chain, copy_check, own_run, departed_at, explained, own_in.flatten(1)


def census_problems(census, expected_bconvs, expected_conv2d):
    """What keeps a converted graph from being the 1-bit network, as a list of sentences."""
    ops = census["ops"]
    problems = []
    if ops.get("LceBconv2d", 0) != expected_bconvs:
        problems.append(f"{ops.get('LceBconv2d', 0)} LceBconv2d ops for {expected_bconvs} binary convs")
    if ops.get("CONV_2D", 0) != expected_conv2d:
        problems.append(f"{ops.get('CONV_2D', 0)} float CONV_2D ops, expected {expected_conv2d}")
    unpacked = [b for b in census["bconv"] if b["input"] != "int32" or b["filter"] != "int32"]
    if unpacked:
        problems.append(f"{len(unpacked)} LceBconv2d ops without bit-packed input and filter")
    return problems


def readable_batches(loader, max_unreadable_share):
    """``(images, labels)`` of each batch of ``loader``, its unreadable images counted and left out."""
    limit = UnreadableLimit(max_unreadable_share, print, images="validation images")
    for batch, inputs in on_device(loader, torch.device("cpu")):
        limit.update(batch.unreadable, len(batch))
        if inputs is not None:
            yield inputs, batch.target


@torch.no_grad()
def torch_latency(model, exported, image_size, threads, runs):
    """Batch-1 latency of PyTorch float inference with the weights binarised once (``exported``,
    as ``as_exported`` returns it) and of the published forward (``model`` with the published
    binarizers, weights binarised at every call)."""
    # As CPU training and the benchmark do for every row: otherwise glibc page-faults the
    # published forward's fresh copies of the weights in at every call.
    keep_freed_host_memory()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    image = torch.randn(1, 3, image_size, image_size)
    try:
        return {name: latency_ms(lambda: m(image), runs) for name, m in
                (("pytorch_binarized_once", exported),
                 ("published_forward", set_binarizers(copy.deepcopy(model), "published", "published").eval()))}
    finally:
        torch.set_num_threads(previous)


def evenly_spaced(count, limit):
    """``limit`` indices spread over ``range(count)`` (all of them without a limit)."""
    if not limit or limit >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(limit - 1, 1)) for i in range(limit)})


def default_lce_env():
    return os.environ.get("LCE_ENV", os.path.join(REPO_ROOT, ".lce_env"))


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="step-2 checkpoint (ours or a released file)")
    parser.add_argument("--data", help="ImageFolder root holding val/")
    parser.add_argument("--out", default="lce_export", help="folder for model.tflite, report.json and lce.log")
    parser.add_argument("--lce_env", default=default_lce_env(),
                        help="virtual environment of LCE (default: $LCE_ENV or .lce_env/ in the repository)")
    parser.add_argument("--setup_only", action="store_true", help="only create or check the LCE environment")
    parser.add_argument("--max_images", type=int, default=0,
                        help="compare on this many validation images, evenly spaced (0: all)")
    parser.add_argument("--part_images", type=int, default=4,
                        help="images of the comparison of each part (stem, blocks, head) on PyTorch's "
                             "inputs, from the first batch")
    parser.add_argument("--sign_eps", type=float, default=1e-5,
                        help="pre-sign values within this of 0 may binarize differently (also the least "
                             "margin of a block's second sign, see docs/export.md)")
    parser.add_argument("--min_agreement", type=float, default=0.0,
                        help="also fail below this top-1 agreement in percent, a bar of your own (default 0: "
                             "none; every disagreement must be explained by near-zero sign flips anyway)")
    parser.add_argument("--kernel", choices=["indirect_bgemm", "bgemm"], default="indirect_bgemm",
                        help="LCE binary conv kernel of the verification (both are timed)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the latency measurements")
    parser.add_argument("--bench_runs", type=int, default=20, help="timed batch-1 runs per engine")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="validation images read, run and compared at a time (the work folder holds one batch)")
    add_workers_flag(parser)
    add_unreadable_flag(parser)
    add_spec_flags(parser, ("image_size", "crop_pct", "resize_rounding", "interpolation", "mean", "std"))
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.setup_only and not (args.checkpoint and args.data):
        parser.error("--checkpoint and --data are required (or --setup_only)")
    return args


def check_args(args):
    """Raises a UserError for values no export can use; the image size when given (else it is the
    checkpoint's, checked by ``check_export_size`` once read)."""
    if args.image_size is not None:
        check_export_size(args.image_size)
    require_positive({f"--{flag}": getattr(args, flag)
                      for flag in ("part_images", "threads", "bench_runs", "batch_size")})
    require_count({f"--{flag}": getattr(args, flag)
                   for flag in ("part_images", "threads", "bench_runs", "batch_size", "max_images")})
    require_at_least(0, {"--max_images": args.max_images, "--sign_eps": args.sign_eps,
                         "--min_agreement": args.min_agreement})
    if args.min_agreement > 100:
        raise UserError(f"--min_agreement is a percentage: at most 100, got {args.min_agreement}")
    require_share("--max_unreadable_share", args.max_unreadable_share)


def check_export_size(size):
    if size < MIN_EXPORT_SIZE or size % 32:
        raise UserError(f"--image_size must be a multiple of 32 (ReActNet-A downsamples by 32) and at "
                        f"least {MIN_EXPORT_SIZE} (LCE's binary conv pads inputs under 3x3 wrongly), "
                        f"got {size}")


def export(args, model, dataset, python):
    """Runs PyTorch and LCE on the validation images, batch by batch; leaves the converted model
    in ``--out`` as CANDIDATE and returns the summary and the LCE report."""
    indices = evenly_spaced(len(dataset), args.max_images)
    loader = make_loader(dataset, [(i, 0) for i in indices], args.batch_size,
                         resolve_workers(args.workers), False)
    exported, reference = as_exported(model), zeros_read_as_plus_one(model)
    parts, reference_parts = model_parts(exported), model_parts(reference)
    print(f"=> {args.checkpoint}: PyTorch and LCE on {len(indices)} images of "
          f"{os.path.join(args.data, 'val')} at {args.image_size} px", flush=True)
    if len(indices) < MIN_IMAGES:
        print(f"=> {len(indices)} images are fewer than the {MIN_IMAGES} a verified export needs: this "
              f"export will be rejected (raise --max_images)", flush=True)
    batches = readable_batches(loader, args.max_unreadable_share)
    first = list(itertools.islice(batches, 1))
    if not first:
        raise UserError("no readable validation image: check the val/ folder")

    # Each part's input in the model's own run of the first images.
    part_inputs = [first[0][0][:args.part_images]]
    with torch.no_grad():
        for _, part in reference_parts[:-1]:
            part_inputs.append(part(part_inputs[-1]))

    spec = {"bn_eps": batchnorm_eps(model), "kernel": args.kernel, "threads": args.threads,
            "bench_runs": args.bench_runs, "full": True}
    print(f"=> converting with Larq Compute Engine ({python}) and running the flatbuffers", flush=True)
    logits, reference_logits, lce_logits, labels, departed_at, explained = [], [], [], [], [], []
    chain = copy_check = own_run = None
    probe_differing, probe_diff, seconds, timed = 0, 0.0, 0.0, 0
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        with start_lce(parts, part_inputs, python, work, spec, numpy_state(exported),
                       os.path.join(args.out, "lce.log")) as lce:
            for index, (images, target) in enumerate(itertools.chain(first, batches)):
                model_logits, probe = lce.run(nhwc(images))
                batch = check_batch(parts, reference_parts, images, [as_maps(nchw(x)) for x in probe],
                                    args.sign_eps)
                chain, copy_check, own_run = (merged(total, new) for total, new in
                                              zip((chain, copy_check, own_run), batch[:3]))
                departed_at.append(batch[3])
                explained.append(batch[4])
                reference_logits.append(batch[5])
                if reference is model:
                    logits.append(batch[5])
                else:
                    with torch.no_grad():
                        logits.append(model(images))
                # model.tflite and the probe's last part: the same computation, the same bits.
                probe_differing += int((model_logits.view(np.uint32) != probe[-1].view(np.uint32)).any(1).sum())
                probe_diff = max(probe_diff, finite_max(torch.from_numpy(model_logits - probe[-1]).abs()))
                lce_logits.append(torch.from_numpy(model_logits))
                labels.append(target)
                now = time.perf_counter()
                if index:  # reading, both engines and the comparison; the first batch waits for the conversions
                    seconds += now - start
                    timed += len(images)
                start = now
            report, outputs = lce.finish()
        os.replace(os.path.join(work, "model.tflite"), os.path.join(args.out, CANDIDATE))
    comparisons = compare_parts(parts, part_inputs, [outputs[f"part_{i}"] for i in range(len(parts))],
                                args.sign_eps)

    logits, reference_logits, lce_logits, labels = map(torch.cat, (logits, reference_logits, lce_logits, labels))
    departed_at, explained = torch.cat(departed_at), torch.cat(explained)
    differ = lce_logits.argmax(1) != reference_logits.argmax(1)
    departed = departed_at < len(parts)
    census = report["model"]
    summary = {
        "checkpoint": args.checkpoint, "image_size": args.image_size, "images": len(labels),
        "classes": len(labels.unique()), "min_images": MIN_IMAGES,
        "min_classes": min(MIN_CLASSES, len(dataset.classes)),
        "census": census["ops"], "parts_census": report["parts"]["ops"],
        "binary_convs": len(binary_convs(model)), "lce_bconvs": census["ops"].get("LceBconv2d", 0),
        "zero_latent_weights": zero_weights(model), "kernel": args.kernel,
        "kernels_max_diff": report["kernels_max_diff"],
        "parts": comparisons, "chain": chain, "as_exported": copy_check, "own_run": own_run,
        "probe_differing_images": probe_differing, "probe_logit_diff": probe_diff,
        "atol": ATOL, "rtol": RTOL, "sign_eps": args.sign_eps, "sign_margin": SIGN_MARGIN,
        "top1_pytorch": (logits.argmax(1) == labels).float().mean().item() * 100,
        "top1_lce": (lce_logits.argmax(1) == labels).float().mean().item() * 100,
        "agreement": 100 - differ.float().mean().item() * 100,
        "disagreements": {"images": int(differ.sum()),
                          "after_sign_flips": int((differ & departed & explained).sum()),
                          "within_rounding": int((differ & ~departed).sum()),
                          "unexplained": int((differ & ~explained).sum())},
        "top_class_share": top_class_share(reference_logits.argmax(1)),
        "max_logit_diff": finite_max((lce_logits - reference_logits).abs()),
        "tflite_bytes": census["bytes"], "checked_sha256": census["sha256"],
        "packed_weight_bytes": sum(b["filter_bytes"] for b in census["bconv"]),
        "state_dict_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "seconds_per_image": seconds / timed if timed else None,
        "threads": args.threads,
        "latency_ms": {**census["latency_ms"],
                       **torch_latency(model, exported, args.image_size, args.threads, args.bench_runs)},
    }
    return summary, report


def finite_max(x):
    """The largest finite value of ``x`` (0 if none): a figure to print, while the checks count
    the values that are not finite."""
    finite = x[torch.isfinite(x)]
    return float(finite.max()) if finite.numel() else 0.0


def top_class_share(predictions):
    """The share, in percent, of the most frequent prediction."""
    return torch.bincount(predictions).max().item() * 100 / len(predictions)


# What each list of per-part comparisons in the summary compares, for its sentences.
COMPARED = {"parts": "fed PyTorch's input",
            "chain": "in model.tflite's chain",
            "as_exported": "of as_exported's copy (the weights given to LCE) against the model on its own run"}


def first_parts(rows, key):
    """Where ``rows`` (per-part dicts) have a nonzero ``key``, as "PART (N) and K parts after it"."""
    found = [r for r in rows if r[key]]
    after = f" and {len(found) - 1} parts after it" if len(found) > 1 else ""
    return f"{found[0]['part']} ({found[0][key]}){after}"


def problems_of(summary, report, min_agreement):
    """Every way the export falls short of the PyTorch model, as sentences (none: verified)."""
    bconvs = summary["binary_convs"]
    problems = census_problems(report["model"], bconvs, 1) + census_problems(report["parts"], bconvs, 1)
    if any(r["nonfinite"] for r in summary["own_run"]):
        problems.append(f"the model itself computes values that are not finite (NaN or inf), first in "
                        f"{first_parts(summary['own_run'], 'nonfinite')}: its checkpoint cannot be verified")
    for check, what in COMPARED.items():
        comparisons = summary[check]
        if any(c["nonfinite"] for c in comparisons):
            problems.append(f"values that are not finite (NaN or inf) {what}: first in "
                            f"{first_parts(comparisons, 'nonfinite')}")
        for c in comparisons:
            if c["unexplained"]:
                problems.append(f"{c['part']} {what}: {c['unexplained']} values beyond the tolerance away "
                                f"from any near-zero pre-sign value")
            if c["near_zero_positions"] > MAX_EXCUSED_SHARE * c["positions"]:
                problems.append(f"{c['part']} {what}: {c['near_zero_positions']} of {c['positions']} positions "
                                f"are reached by a near-zero pre-sign value, more than {MAX_EXCUSED_SHARE:.0%}: "
                                f"the comparison cannot discriminate there")
    unexplained = sum(r["unexplained"] for r in summary["own_run"])
    if unexplained:
        problems.append(f"{unexplained} images leave the model's own run beyond the tolerance where no "
                        f"near-zero pre-sign value reaches, first in {first_parts(summary['own_run'], 'unexplained')}; "
                        f"{summary['disagreements']['unexplained']} of them with another top-1")
    if summary["probe_differing_images"]:
        problems.append(f"model.tflite's logits are not bit for bit its chain's on {summary['probe_differing_images']} "
                        f"images (up to {summary['probe_logit_diff']:.3g} apart)")
    kernels = summary["kernels_max_diff"]
    if kernels is None:
        problems.append("LCE's two kernels give values that are not finite")
    elif kernels > ATOL:
        problems.append(f"LCE's two kernels differ by up to {kernels:.3g}")
    if summary["images"] < MIN_IMAGES or summary["classes"] < summary["min_classes"]:
        problems.append(f"too few images to verify: {summary['images']} compared, with {summary['classes']} "
                        f"distinct labels; a verified export needs at least {MIN_IMAGES} images of at least "
                        f"{summary['min_classes']} classes (raise --max_images)")
    if summary["agreement"] < min_agreement:
        problems.append(f"top-1 agreement {summary['agreement']:.2f}% is below --min_agreement {min_agreement}%")
    return problems


def print_comparisons(comparisons):
    for c in comparisons:
        print(f"   {c['part']:>10}: max |diff| {c['max_diff']:.2e} away from the {c['near_zero_positions']} of "
              f"{c['positions']} positions a near-zero pre-sign value reaches; {c['differing_positions']} "
              f"positions beyond the tolerance, {c['unexplained']} values unexplained"
              + (f", {c['nonfinite']} not finite" if c["nonfinite"] else ""))


def print_summary(s):
    print("=> op census of model.tflite: " + ", ".join(f"{k} {v}" for k, v in s["census"].items()))
    print(f"=> {s['zero_latent_weights']} latent binary weights are exactly 0: the flatbuffer and the "
          f"model it is compared with take them as +1 (PyTorch's sign: 0)")
    kernels = "not finite" if s["kernels_max_diff"] is None else f"{s['kernels_max_diff']:.3g}"
    print(f"=> stem, each block and head, fed PyTorch's input of that part: |LCE - PyTorch| <= "
          f"{s['atol']:g} + {s['rtol']:g} max |PyTorch| of the channel, except at positions a "
          f"pre-sign value within {s['sign_eps']:g} of 0 (a second sign: within {s['sign_margin']} times the "
          f"image's measured rounding) reaches ({s['kernel']} kernel; the other differs by at most {kernels})")
    print_comparisons(s["parts"])
    print(f"=> model.tflite on every image, as a chain: each part fed LCE's own output of the part before "
          f"it, against PyTorch on that input (same tolerance); model.tflite's logits differ from the "
          f"chain's in {s['probe_differing_images']} images (bit for bit)")
    print_comparisons(s["chain"])
    copies = s["as_exported"]
    print(f"=> as_exported's copy (the weights given to LCE) against the model itself, each part on the "
          f"model's own run (same tolerance): max |diff| {max(c['max_diff'] for c in copies):.2e}, "
          f"{sum(c['unexplained'] for c in copies)} values unexplained")
    print_comparisons([c for c in copies if c["unexplained"] or c["nonfinite"]])
    departed = ", ".join(f"{r['part']} {r['departed']}" for r in s["own_run"] if r["departed"]) or "none"
    unexplained = sum(r["unexplained"] for r in s["own_run"])
    print(f"=> each image followed through the model's own run: LCE's outputs leave it beyond the tolerance "
          f"where near-zero pre-sign values reach ({departed}); elsewhere: {unexplained} images")
    d = s["disagreements"]
    print(f"=> top-1 on {s['images']} images of {s['classes']} classes: PyTorch {s['top1_pytorch']:.3f}%, LCE "
          f"{s['top1_lce']:.3f}%, agreement {s['agreement']:.2f}% (PyTorch's most frequent class: "
          f"{s['top_class_share']:.1f}% of the images), max |logit diff| {s['max_logit_diff']:.3g}; "
          f"{d['images']} images with another top-1: {d['after_sign_flips']} after near-zero sign flips, "
          f"{d['within_rounding']} within the tolerance of a tie, {d['unexplained']} unexplained")
    print(f"=> batch-1 latency at {s['image_size']} px, {s['threads']} thread(s), median (min-max) ms "
          f"[median CPU ms]: " + "; ".join(f"{k} {v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f}) "
                                           f"[{v['cpu_median']:.1f}]" for k, v in s["latency_ms"].items()))
    print(f"=> size: model.tflite {s['tflite_bytes'] / MB:.2f} MB (bit-packed binary weights "
          f"{s['packed_weight_bytes'] / MB:.2f} MB) against a {s['state_dict_bytes'] / MB:.1f} MB float32 "
          f"state_dict")
    print(f"=> {s['shipped']}, read back: sha256 {s['tflite_sha256']}"
          + (" (the bytes LCE ran)" if s["tflite_sha256"] == s["checked_sha256"] else
             f", not {s['checked_sha256']}, the bytes LCE ran"))


def ship(out, problems, checked_sha256):
    """Renames the candidate to model.tflite, or to REJECTED when there are ``problems``, and reads it
    back: when those are not the bytes LCE ran (``checked_sha256``), the file is rejected and one
    more problem says so.

    Returns:
        (the file's name in ``out``, its sha256).
    """
    name = REJECTED if problems else "model.tflite"
    os.replace(os.path.join(out, CANDIDATE), os.path.join(out, name))
    with open(os.path.join(out, name), "rb") as f:
        shipped = hashlib.sha256(f.read()).hexdigest()
    if shipped != checked_sha256:
        problems.append(f"{name} as written (sha256 {shipped}) is not the file that was checked (sha256 "
                        f"{checked_sha256})")
        os.replace(os.path.join(out, name), os.path.join(out, REJECTED))
        name = REJECTED
    return name, shipped


# What the export maps to LCE operators: ReActNet-A's topology, sign activations, and weights as
# per-channel mean-|W| scaled signs. Binarizers outside these sets may compute other values.
EXPORTABLE_ARCHS = ("reactnet_a",)
SIGN_ACT_BINARIZERS = ("polynomial", "ste", "published")
SCALED_SIGN_WEIGHT_BINARIZERS = ("scaled_sign", "published")


def check_exportable(spec, path):
    """A UserError, in one line, for a model the export does not map."""
    if spec.arch not in EXPORTABLE_ARCHS:
        raise UserError(f"{path} holds a {get_architecture(spec.arch).title} (--arch {spec.arch}): the "
                        f"LCE export maps only ReActNet-A's topology ({', '.join(EXPORTABLE_ARCHS)})")
    if spec.act_binarizer not in SIGN_ACT_BINARIZERS or spec.weight_binarizer not in SCALED_SIGN_WEIGHT_BINARIZERS:
        raise UserError(f"{path} was trained with --act_binarizer {spec.act_binarizer} --weight_binarizer "
                        f"{spec.weight_binarizer}: the LCE export maps only sign activations "
                        f"({', '.join(SIGN_ACT_BINARIZERS)}) and scaled sign weights "
                        f"({', '.join(SCALED_SIGN_WEIGHT_BINARIZERS)})")


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    if args.setup_only:
        print(f"=> LCE environment ready: {lce_python(args.lce_env)}")
        return None
    check_args(args)
    model = model_for(args)
    args.image_size = model.spec.image_size  # the exported model's input size
    check_export_size(args.image_size)
    if model.spec.step != 2:
        raise UserError(f"{args.checkpoint} is a step-{model.spec.step} checkpoint (real-valued weights): "
                        f"only a step-2 model has binary weights to run as bits; pass step 2's checkpoint")
    check_exportable(model.spec, args.checkpoint)
    model.eval()
    dataset = open_split(args.data, "val", model.spec, num_classes=model.spec.num_classes)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to --out {args.out} ({e.strerror})") from None
    python = lce_python(args.lce_env)

    summary, report = export(args, model, dataset, python)
    problems = problems_of(summary, report, args.min_agreement)
    summary["shipped"], summary["tflite_sha256"] = ship(args.out, problems, summary["checked_sha256"])
    summary = {"verified": not problems, "problems": problems, **summary}
    # Last, so that a report.json from this run always describes a finished export.
    with open(os.path.join(args.out, "report.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1, allow_nan=False)
    os.replace(os.path.join(args.out, "report.json.tmp"), os.path.join(args.out, "report.json"))
    print_summary(summary)
    if problems:
        raise UserError(f"the export does not match PyTorch (kept as {os.path.join(args.out, REJECTED)}): "
                        + "; ".join(problems))
    print(f"export: {summary['lce_bconvs']} of {summary['binary_convs']} binary convolutions as "
          f"LceBconv2d, top-1 agreement {summary['agreement']:.2f}% on {summary['images']} images, "
          f"size {summary['tflite_bytes'] / MB:.2f} MB")
    return summary


if __name__ == "__main__":
    main()
