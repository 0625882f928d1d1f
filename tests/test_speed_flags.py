"""The speed flags (--amp, --channels_last, --compile, --fused_optimizer) train, and keep the binarizers exact.

The end-to-end runs train 2 epochs: the schedule is stepped at the start of each epoch, so epoch 0
trains at lr * (1 - 1/2) and epoch 1 at 0. Every change of a parameter therefore comes from epoch
0's updates, and is checked against the parameters' known initial values.
"""
import math
import re
import shutil

import pytest
import torch

from conftest import run_script, train_args
from models import reactnet
from models.layers import BinaryConv2d
from utils.distill import distillation_loss

LR = 1.25e-3  # the Adam default of the train scripts
EPOCH0_LR = LR * (1 - 1 / 2)
# Adam moves an entry by at most lr * (1 - beta1) / sqrt(1 - beta2) per step (Kingma & Ba, 2.1).
ADAM_STEP_BOUND = (1 - 0.9) / math.sqrt(1 - 0.999)
# On a CPU, inductor (torch.compile's default backend) compiles its kernels with a C++ compiler.
HAS_COMPILER = bool(shutil.which("g++") or shutil.which("cc"))
COMPILE_BACKENDS = ["aot_eager"] + (["inductor"] if HAS_COMPILER else [])
# The inductor runs below use one shape (3 classes, batch 4, 32 px, training mode), so the
# end-to-end run finds the in-process test's kernels in inductor's on-disk cache.
CLASSES, COMPILE_BATCH, SIZE = 3, 4, 32


def training_losses(output):
    """The loss of every training progress line (validation lines are left out)."""
    return [float(v) for v in re.findall(r"^Epoch: \[.*\tLoss (\S+) \(", output, re.M)]


def assert_close_to_largest(actual, expected, rtol, name):
    """Close up to ``rtol`` of the largest expected magnitude: a fused kernel's summation order
    moves small entries by more than ``rtol`` of themselves."""
    atol = rtol * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def known_initial_value(name):
    """What PyTorch's default initialisation gives a parameter; None where it is random."""
    if ".move" in name or (".bn" in name and name.endswith(".bias")):
        return 0.0  # LearnableBias starts at zero, BatchNorm's shift too
    if ".bn" in name and name.endswith(".weight"):
        return 1.0
    if ".prelu" in name:
        return 0.25  # nn.PReLU's default slope
    return None


def assert_trained_away_from_initialisation(state_dict, epoch0_iterations):
    """Epoch 0's updates moved every parameter of known initial value, within Adam's bound.

    Step 2's latent binary weights start in [0, 0.001) (uniform * 0.001), so negative ones moved.
    """
    bound = epoch0_iterations * EPOCH0_LR * ADAM_STEP_BOUND
    negative, binary_total, checked = 0, 0, 0
    for name, tensor in state_dict.items():
        if ".binary_" in name:
            assert tensor.max() < 0.001 + bound and tensor.min() > -bound, name
            assert (tensor < 0).any(), f"{name}: no latent weight left [0, 0.001)"
            negative += (tensor < 0).sum().item()
            binary_total += tensor.numel()
        initial = known_initial_value(name)
        if initial is not None:
            moved = (tensor - initial).abs()
            assert (moved > 0).float().mean() > 0.9, f"{name}: most entries kept their initial value"
            assert moved.max() <= bound, f"{name}: moved {moved.max():.3g}, more than Adam allows"
            checked += 1
    # Per block 6 shifts, 2 slopes and 2 or (widening) 3 BatchNorms; the stem's BatchNorm.
    assert checked == 13 * (6 + 2 + 2 * 2) + 5 * 2 + 2
    assert negative > 0.1 * binary_total


def assert_finite(obj, where="checkpoint"):
    if isinstance(obj, torch.Tensor):
        assert not obj.is_floating_point() or torch.isfinite(obj).all(), where
    elif isinstance(obj, dict):
        for k, v in obj.items():
            assert_finite(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            assert_finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), where


def binarized_weights_seen_by_convs(model, images, dtype):
    """The weight tensors each binary conv hands to F.conv2d during one autocast forward."""
    seen = []
    for module in model.modules():
        if isinstance(module, BinaryConv2d):
            binarizer = module.weight_binarizer
            module.weight_binarizer = lambda w, b=binarizer: seen.append(b(w)) or seen[-1]
    with torch.autocast("cpu", dtype=dtype):
        model(images)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_binary_weights_are_exactly_plus_minus_alpha_under_autocast(dtype):
    torch.manual_seed(0)
    model = reactnet(5, binary_weights=True).to(memory_format=torch.channels_last)
    with torch.no_grad():
        for conv in model.modules():
            if isinstance(conv, BinaryConv2d):
                conv.weight.normal_()
    seen = binarized_weights_seen_by_convs(model, torch.randn(2, 3, 32, 32), dtype)
    assert len(seen) == 13 * 2 + 5  # a 3x3 and a 1x1 per block, a second 1x1 in the 5 widening ones
    for binary in seen:
        magnitude = binary.to(dtype).abs().flatten(1)  # what the autocast convolution multiplies by
        assert torch.equal(magnitude, magnitude[:, :1].expand_as(magnitude))  # one alpha per channel
        assert (magnitude > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compiled_student_matches_eager_values_and_gradients(backend):
    torch.manual_seed(0)
    eager = reactnet(CLASSES, binary_weights=True)
    with torch.no_grad():  # latent weights of both signs, so the binarizers have work to do
        for conv in eager.modules():
            if isinstance(conv, BinaryConv2d):
                conv.weight.uniform_(-0.001, 0.001)
    compiled = torch.compile(eager, backend=backend)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(COMPILE_BATCH, 3, SIZE, SIZE, generator=g)
    teacher = torch.randn(COMPILE_BATCH, CLASSES, generator=g)
    results = []
    for model in (eager, compiled):
        model.zero_grad()
        logits = model(images)
        loss = distillation_loss(logits, teacher)
        loss.backward()
        results.append((logits.detach(), [p.grad.clone() for p in eager.parameters()]))
    (logits_a, grads_a), (logits_b, grads_b) = results
    assert_close_to_largest(logits_b, logits_a, 1e-5, "logits")
    assert all(g.abs().sum() > 0 for g in grads_a)
    for (name, _), a, b in zip(eager.named_parameters(), grads_a, grads_b):
        assert_close_to_largest(b, a, 1e-4, name)


# ``--compile`` alone selects inductor, which needs a C++ compiler on a CPU.
COMPILE_FLAGS = ["--compile"] if HAS_COMPILER else ["--compile", "aot_eager"]
COMPILE_BACKEND = "inductor" if HAS_COMPILER else "aot_eager"


def assert_effects_of(flags, state, stderr, iterations):
    """What each flag leaves behind, so that a flag that is silently ignored fails."""
    adam_steps = {s["step"].item() for s in state["optimizer"]["state"].values()}
    if "fp16" in flags:
        # At GradScaler's initial scale of 2**16 this model's fp16 gradients overflow: the scaler
        # skips those steps (Adam does not count them) and halves its scale. In float32 nothing
        # would overflow.
        assert 1 <= min(adam_steps) and max(adam_steps) < 2 * iterations
        assert math.isfinite(state["scaler"]["scale"]) and state["scaler"]["scale"] < 2.0 ** 16
    else:
        assert state["scaler"] == {} and adam_steps == {2 * iterations}
    if "--channels_last" in flags:
        # The checkpoint keeps the strides of the weights it was given.
        for name, tensor in state["state_dict"].items():
            if tensor.dim() == 4 and tensor.shape[-1] == 3:
                assert tensor.is_contiguous(memory_format=torch.channels_last), name
                assert not tensor.is_contiguous(), name
    if "--fused_optimizer" in flags:
        assert all(group["fused"] for group in state["optimizer"]["param_groups"])
    if "--compile" in flags:
        assert state["args"]["compile"] == COMPILE_BACKEND
        # TorchDynamo's log (TORCH_LOGS=dynamo): the student's forward and the teacher's went to the backend.
        assert re.findall(r"Step 2: calling compiler function (\w+)", stderr) == [COMPILE_BACKEND] * 2
        assert re.search(r"attempted to trace the following frames: \[\n.*\* forward \S*reactnet\.py",
                         stderr)


@pytest.mark.slow
@pytest.mark.parametrize("flags, batch_size", [
    (["--amp", "bf16", "--channels_last"], 8),
    # fp16: 6 iterations in epoch 0, so that some updates remain after the skipped ones.
    (["--amp", "fp16"], 4),
    (COMPILE_FLAGS + ["--fused_optimizer"], COMPILE_BATCH),
], ids=["bf16_channels_last", "fp16", "compile_fused"])
def test_step2_trains_with_speed_flags(tiny_data, teacher_weights, tmp_path, flags, batch_size):
    args = train_args(tiny_data, teacher_weights, tmp_path, "--step1_checkpoint", "none", *flags,
                      epochs=2, batch_size=batch_size)
    result = run_script("step2/train.py", *args, env={"TORCH_LOGS": "dynamo"})
    assert result.returncode == 0, result.stderr[-3000:]
    iterations = 24 // batch_size  # tiny_data: 3 classes of 8 training images
    learning_rates = [float(v) for v in re.findall(r"^learning_rate: (\S+)$", result.stdout, re.M)]
    assert learning_rates == pytest.approx([EPOCH0_LR, 0.0], abs=1e-15)
    losses = training_losses(result.stdout)
    assert len(losses) == 2 * iterations and all(math.isfinite(v) for v in losses)

    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 2
    assert not any(k.startswith("_orig_mod.") for k in state["state_dict"])
    assert_finite(state)
    assert_trained_away_from_initialisation(state["state_dict"], iterations)
    assert_effects_of(flags, state, result.stderr, iterations)
