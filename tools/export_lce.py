"""Runs a step-2 ReActNet-A as a 1-bit network: export to Larq Compute Engine, verify, time.

    python -m tools.export_lce --checkpoint step2/models/model_best.pth.tar --data /data/imagenet

Writes OUT/model.tflite (every binary conv an ``LceBconv2d`` with bit-packed weights and
activations), OUT/report.json and OUT/lce.log. LCE needs TensorFlow and numpy < 2, so it lives in
a virtual environment of its own (``--lce_env``, created from tools/lce/requirements.txt on first
use and reused while that file is unchanged); this process writes weights and reference
activations to a work folder and tools/lce/convert.py, run by that environment's Python, reads them.

The flatbuffer binarizes a latent weight of exactly 0 to +1 (PyTorch's sign gives 0; a bit has no
0). Verification checks the flatbuffers, not the float model:
  1. op census: every binary conv is an LceBconv2d with bit-packed input and filter, and the
     stem is the only CONV_2D;
  2. the stem, each block and the head, converted side by side into one more flatbuffer and fed
     PyTorch's own input of that part, match PyTorch (with the flatbuffer's weights) within the
     tolerance, except at output positions that a value before a sign within ``--sign_eps`` of 0
     reaches (counted: LCE's sign(0) is +1 and PyTorch's 0, and rounding can flip a sign that
     close to 0); both of LCE's optimized kernels give the same outputs;
  3. end to end, the flatbuffer's top-1 agrees with the PyTorch model's (evaluate.py's model,
     transforms and order) on the validation images.
Then batch-1 latency: LCE's two kernels against PyTorch with weights binarised once and against
the published forward (weights binarised at every call).
"""
import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

from models.binarize import binarize_weight
from models.checkpoint import model_from_checkpoint
from models.published import use_published_binarizers
from models.reactnet import BasicBlock, Stem, binary_convs
from tools.lce.timing import latency_ms
from utils.cli import (OneLineErrorParser, add_unreadable_flag, add_workers_flag, require_at_least,
                       require_positive, require_share, resolve_workers)
from utils.data import make_loader, on_device, open_split
from utils.errors import UserError, report_user_errors
from utils.evaluation import UnreadableLimit
from utils.runtime import keep_freed_host_memory
from utils.training_flags import REPO_ROOT

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


def lce_python(env):
    """The Python of the LCE environment at ``env``, created or brought up to date first.

    An environment whose stamp matches tools/lce/requirements.txt is reused as it is (no network,
    no pip); otherwise it is rebuilt from scratch.

    Raises:
        UserError: ``env`` is something other than a virtual environment, or the install failed.
    """
    python = os.path.join(env, "bin", "python")
    with open(REQUIREMENTS, "rb") as f:
        wanted = hashlib.sha256(f.read()).hexdigest()
    stamp = os.path.join(env, STAMP)
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
    with open(stamp, "w") as f:
        f.write(wanted + "\n")
    return python


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


def near_zero_positions(block, sign_inputs, eps):
    """(N, H, W) output positions of ``block`` that a pre-sign value within ``eps`` of 0 reaches.

    The 3x3 conv carries a sign of its input to every output whose window covers it; the 1x1
    conv's sign acts on its own position only. Every channel of a flagged position is flagged.
    """
    first, second = ((s.abs() <= eps).any(dim=1, keepdim=True).float() for s in sign_inputs)
    reached = F.max_pool2d(first, 3, block.stride, padding=1)
    return (reached + second).squeeze(1) > 0


@torch.no_grad()
def part_reference(part, x, sign_eps):
    """PyTorch's output of ``part`` on ``x`` and the positions of it that a pre-sign value within
    ``sign_eps`` of 0 reaches (none outside the blocks, which alone binarize)."""
    if not isinstance(part, BasicBlock):
        y = as_maps(part(x))
        return y, torch.zeros(len(y), *y.shape[2:], dtype=torch.bool)
    sign_inputs = []
    handle = part.binary_activation.register_forward_pre_hook(lambda m, args: sign_inputs.append(args[0]))
    try:
        y = part(x)
    finally:
        handle.remove()
    return y, near_zero_positions(part, sign_inputs, sign_eps)


def compare(expected, actual, near_zero):
    """How far LCE's output of a part is from PyTorch's, away from the ``near_zero`` positions."""
    diff = (actual - expected).abs()
    outside = diff > ATOL + RTOL * expected.abs().amax(dim=(0, 2, 3), keepdim=True)
    flagged = near_zero.unsqueeze(1).expand_as(diff)
    return {"max_diff": float(diff[~flagged].max()) if (~flagged).any() else 0.0,
            "positions": near_zero.numel(),
            "near_zero_positions": int(near_zero.sum()),
            "differing_positions": int(outside.any(dim=1).sum()),
            "unexplained": int((outside & ~flagged).sum())}


def part_spec(prefix, part, x):
    """What tools/lce/convert.py needs to rebuild ``part`` for inputs shaped like ``x``."""
    spec = {"prefix": prefix, "input_shape": list(x.shape[2:]) + [x.shape[1]]}
    if isinstance(part, BasicBlock):
        return dict(spec, kind="block", stride=part.stride, widening=part.widening)
    return dict(spec, kind="stem" if isinstance(part, Stem) else "head")


def run_lce(python, work, spec, weights, part_inputs, log):
    """Writes the work files, runs tools/lce/convert.py in the LCE environment, reads its results.

    ``WORK/images.npy`` must already hold the images when ``spec["full"]``; the LCE side's output
    goes to the file ``log``.

    Returns:
        (report dict, outputs dict of numpy arrays).

    Raises:
        UserError: the LCE side failed.
    """
    with open(os.path.join(work, "spec.json"), "w") as f:
        json.dump(spec, f)
    np.savez(os.path.join(work, "weights.npz"), **weights)
    np.savez(os.path.join(work, "part_inputs.npz"), **{str(i): x for i, x in enumerate(part_inputs)})
    with open(log, "w") as f:
        result = subprocess.run([python, "-m", "tools.lce.convert", work], cwd=REPO_ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        raise UserError(f"the LCE conversion failed (exit status {result.returncode}): "
                        f"{lines[-1][:300] if lines else 'no output'}; its whole output is in {log}")
    with open(os.path.join(work, "report.json")) as f:
        report = json.load(f)
    with np.load(os.path.join(work, "outputs.npz")) as outputs:
        return report, dict(outputs)


def verify_parts(named_parts, inputs, python, work, sign_eps, spec=None, weights=None, log=None):
    """Converts parts of ReActNet-A with LCE, feeds each PyTorch's input of that part, and compares
    the outputs with PyTorch's.

    Args:
        named_parts: ``(state_dict prefix, module)`` pairs: BasicBlocks, the Stem, or the head
            (global pooling, flatten, fc), as ``as_exported`` returns them; ``weights`` holds
            their keys (default: taken from the modules alone).
        inputs: one NCHW float tensor per part.
        python, work: the LCE environment's Python and an empty work folder.
        sign_eps: pre-sign values within this of 0 may binarize differently (see module doc).
        spec, weights: the whole model's spec and weights, to convert and run it too.
        log: file for the LCE side's output (default: in ``work``).

    Returns:
        (per-part comparisons, LCE report, LCE outputs).
    """
    if weights is None:
        weights = numpy_state(torch.nn.ModuleDict({k.rstrip("."): m for k, m in named_parts}))
    spec = dict(spec or {"bn_eps": batchnorm_eps(named_parts[0][1]), "kernel": "indirect_bgemm"})
    spec["parts"] = [part_spec(prefix, part, x) for (prefix, part), x in zip(named_parts, inputs)]
    report, outputs = run_lce(python, work, spec, weights, [nhwc(x) for x in inputs],
                              log or os.path.join(work, "lce.log"))
    comparisons = []
    for i, ((prefix, part), x) in enumerate(zip(named_parts, inputs)):
        expected, near_zero = part_reference(part, x, sign_eps)
        actual = torch.from_numpy(outputs[f"part_{i}"])
        actual = actual.permute(0, 3, 1, 2) if actual.dim() == 4 else as_maps(actual)
        comparisons.append(dict(compare(expected, actual, near_zero), part=prefix.rstrip(".") or "head"))
    return comparisons, report, outputs


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


@torch.no_grad()
def pytorch_predictions(model, loader, images_path, count, image_size, max_unreadable_share):
    """Runs ``model`` over ``loader`` (evaluate.py's images and order) and stores each readable
    image, channels last, in a .npy file of ``count`` slots for the LCE side.

    Returns:
        (logits, labels, number of images stored).
    """
    images = np.lib.format.open_memmap(images_path, "w+", np.float32, (count, image_size, image_size, 3))
    logits, labels, stored = [], [], 0
    limit = UnreadableLimit(max_unreadable_share, print, images="validation images")
    for batch, inputs in on_device(loader, torch.device("cpu")):
        limit.update(batch.unreadable, len(batch))
        if inputs is None:
            continue
        images[stored:stored + len(inputs)] = nhwc(inputs)
        stored += len(inputs)
        logits.append(model(inputs))
        labels.append(batch.target)
    images.flush()
    if not stored:
        raise UserError("no readable validation image: check the val/ folder")
    return torch.cat(logits), torch.cat(labels), stored


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
                 ("published_forward", use_published_binarizers(copy.deepcopy(model)).eval()))}
    finally:
        torch.set_num_threads(previous)


def evenly_spaced(count, limit):
    """``limit`` indices spread over ``range(count)`` (all of them without a limit)."""
    if not limit or limit >= count:
        return list(range(count))
    return sorted({round(i * (count - 1) / max(limit - 1, 1)) for i in range(limit)})


def default_lce_env():
    return os.environ.get("LCE_ENV", os.path.join(REPO_ROOT, ".lce_env"))


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="step-2 checkpoint (ours or a released file)")
    parser.add_argument("--data", help="ImageFolder root holding val/")
    parser.add_argument("--out", default="lce_export", help="folder for model.tflite, report.json and lce.log")
    parser.add_argument("--lce_env", default=default_lce_env(),
                        help="virtual environment of LCE (default: $LCE_ENV or .lce_env/ in the repository)")
    parser.add_argument("--setup_only", action="store_true", help="only create or check the LCE environment")
    parser.add_argument("--image_size", type=int, default=224, help="input size of the exported model")
    parser.add_argument("--max_images", type=int, default=0,
                        help="compare on this many validation images, evenly spaced (0: all)")
    parser.add_argument("--part_images", type=int, default=4,
                        help="images of the comparison of each part (stem, blocks, head)")
    parser.add_argument("--sign_eps", type=float, default=1e-5,
                        help="pre-sign values within this of 0 may binarize differently")
    parser.add_argument("--min_agreement", type=float, default=99.0,
                        help="fail below this top-1 agreement in percent")
    parser.add_argument("--kernel", choices=["indirect_bgemm", "bgemm"], default="indirect_bgemm",
                        help="LCE binary conv kernel of the verification (both are timed)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the latency measurements")
    parser.add_argument("--bench_runs", type=int, default=20, help="timed batch-1 runs per engine")
    parser.add_argument("--batch_size", type=int, default=64)
    add_workers_flag(parser)
    add_unreadable_flag(parser)
    args = parser.parse_args(argv)
    if not args.setup_only and not (args.checkpoint and args.data):
        parser.error("--checkpoint and --data are required (or --setup_only)")
    return args


def check_args(args):
    if args.image_size < MIN_EXPORT_SIZE or args.image_size % 32:
        raise UserError(f"--image_size must be a multiple of 32 (ReActNet-A downsamples by 32) and at "
                        f"least {MIN_EXPORT_SIZE} (LCE's binary conv pads inputs under 3x3 wrongly), "
                        f"got {args.image_size}")
    require_positive({f"--{flag}": getattr(args, flag)
                      for flag in ("part_images", "threads", "bench_runs", "batch_size")})
    require_at_least(0, {"--max_images": args.max_images, "--sign_eps": args.sign_eps})
    require_share("--max_unreadable_share", args.max_unreadable_share)


def export(args, model, dataset, python):
    """Runs PyTorch on the validation images, then LCE on the same inputs; returns the summary and
    the LCE report."""
    indices = evenly_spaced(len(dataset), args.max_images)
    loader = make_loader(dataset, [(i, 0) for i in indices], args.batch_size,
                         resolve_workers(args.workers), False)
    exported = as_exported(model)
    # Forward order: the stem, the 13 blocks, then the head from global pooling on.
    parts = [(f"feature.{i}.", m) for i, m in enumerate(exported.feature)]
    parts.append(("", torch.nn.Sequential(exported.pool1, torch.nn.Flatten(), exported.fc)))
    with tempfile.TemporaryDirectory(dir=args.out) as work:
        images_path = os.path.join(work, "images.npy")
        print(f"=> {args.checkpoint}: PyTorch on {len(indices)} images of "
              f"{os.path.join(args.data, 'val')} at {args.image_size} px", flush=True)
        logits, labels, count = pytorch_predictions(model, loader, images_path, len(indices), args.image_size,
                                                    args.max_unreadable_share)

        part_inputs = []
        hooks = [m.register_forward_pre_hook(lambda m, a: part_inputs.append(a[0]))
                 for m in [*exported.feature, exported.pool1]]
        with torch.no_grad():
            first = np.array(np.load(images_path, mmap_mode="r")[:min(args.part_images, count)])
            exported(torch.from_numpy(first).permute(0, 3, 1, 2))
        for hook in hooks:
            hook.remove()

        spec = {"bn_eps": batchnorm_eps(model), "kernel": args.kernel, "threads": args.threads,
                "bench_runs": args.bench_runs, "full": True, "images": count}
        print(f"=> converting with Larq Compute Engine ({python}) and running the flatbuffers", flush=True)
        comparisons, report, outputs = verify_parts(
            parts, part_inputs, python, work, args.sign_eps, spec, numpy_state(exported),
            os.path.join(args.out, "lce.log"))
        os.replace(os.path.join(work, "model.tflite"), os.path.join(args.out, "model.tflite"))

    lce_logits = torch.from_numpy(outputs["logits"])
    census = report["model"]
    summary = {
        "checkpoint": args.checkpoint, "image_size": args.image_size, "images": count,
        "census": census["ops"], "parts_census": report["parts"]["ops"],
        "binary_convs": len(binary_convs(model)), "lce_bconvs": census["ops"].get("LceBconv2d", 0),
        "zero_latent_weights": zero_weights(model), "kernel": args.kernel,
        "kernels_max_diff": report["kernels_max_diff"],
        "parts": comparisons, "atol": ATOL, "rtol": RTOL, "sign_eps": args.sign_eps,
        "top1_pytorch": (logits.argmax(1) == labels).float().mean().item() * 100,
        "top1_lce": (lce_logits.argmax(1) == labels).float().mean().item() * 100,
        "agreement": (lce_logits.argmax(1) == logits.argmax(1)).float().mean().item() * 100,
        "max_logit_diff": (lce_logits - logits).abs().max().item(),
        "tflite_bytes": census["bytes"],
        "packed_weight_bytes": sum(b["filter_bytes"] for b in census["bconv"]),
        "state_dict_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
        "threads": args.threads,
        "latency_ms": {**report["latency_ms"],
                       **torch_latency(model, exported, args.image_size, args.threads, args.bench_runs)},
    }
    return summary, report


def problems_of(summary, report, min_agreement):
    """Every way the export falls short of the PyTorch model, as sentences (none: verified)."""
    bconvs = summary["binary_convs"]
    problems = census_problems(report["model"], bconvs, 1) + census_problems(report["parts"], bconvs, 1)
    problems += [f"{c['part']}: {c['unexplained']} values beyond the tolerance away from any "
                 f"near-zero pre-sign value" for c in summary["parts"] if c["unexplained"]]
    if summary["kernels_max_diff"] > ATOL:
        problems.append(f"LCE's two kernels differ by up to {summary['kernels_max_diff']:.3g}")
    if summary["agreement"] < min_agreement:
        problems.append(f"top-1 agreement {summary['agreement']:.2f}% is below --min_agreement {min_agreement}%")
    return problems


def print_summary(s):
    print("=> op census of model.tflite: " + ", ".join(f"{k} {v}" for k, v in s["census"].items()))
    print(f"=> {s['zero_latent_weights']} latent binary weights are exactly 0: the flatbuffer and the "
          f"per-part reference take them as +1 (PyTorch's sign: 0)")
    print(f"=> stem, each block and head, fed PyTorch's input of that part: |LCE - PyTorch| <= "
          f"{s['atol']:g} + {s['rtol']:g} max |PyTorch| of the channel, except at positions a "
          f"pre-sign value within {s['sign_eps']:g} of 0 reaches ({s['kernel']} kernel; the other "
          f"differs by at most {s['kernels_max_diff']:.3g})")
    for c in s["parts"]:
        print(f"   {c['part']:>10}: max |diff| {c['max_diff']:.2e} away from the {c['near_zero_positions']} of "
              f"{c['positions']} positions a near-zero pre-sign value reaches; {c['differing_positions']} "
              f"positions beyond the tolerance, {c['unexplained']} values unexplained")
    print(f"=> top-1 on {s['images']} images: PyTorch {s['top1_pytorch']:.3f}%, LCE {s['top1_lce']:.3f}%, "
          f"agreement {s['agreement']:.2f}%, max |logit diff| {s['max_logit_diff']:.3g}")
    print(f"=> batch-1 latency at {s['image_size']} px, {s['threads']} thread(s), median (min-max) ms "
          f"[median CPU ms]: " + "; ".join(f"{k} {v['median']:.1f} ({v['min']:.1f}-{v['max']:.1f}) "
                                           f"[{v['cpu_median']:.1f}]" for k, v in s["latency_ms"].items()))
    print(f"=> size: model.tflite {s['tflite_bytes'] / MB:.2f} MB (bit-packed binary weights "
          f"{s['packed_weight_bytes'] / MB:.2f} MB) against a {s['state_dict_bytes'] / MB:.1f} MB float32 "
          f"state_dict")


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    if args.setup_only:
        print(f"=> LCE environment ready: {lce_python(args.lce_env)}")
        return None
    check_args(args)
    model, step = model_from_checkpoint(args.checkpoint)
    if step != 2:
        raise UserError(f"{args.checkpoint} is a step-{step} checkpoint (real-valued weights): only a "
                        f"step-2 model has binary weights to run as bits; pass step 2's checkpoint")
    model.eval()
    dataset = open_split(args.data, "val", args.image_size, num_classes=model.fc.out_features)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write to --out {args.out} ({e.strerror})") from None
    python = lce_python(args.lce_env)

    summary, report = export(args, model, dataset, python)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_summary(summary)
    problems = problems_of(summary, report, args.min_agreement)
    if problems:
        raise UserError("the export does not match PyTorch: " + "; ".join(problems))
    print(f"export: {summary['lce_bconvs']} of {summary['binary_convs']} binary convolutions as "
          f"LceBconv2d, top-1 agreement {summary['agreement']:.2f}% on {summary['images']} images, "
          f"size {summary['tflite_bytes'] / MB:.2f} MB")
    return summary


if __name__ == "__main__":
    main()
