"""The speed flags (--amp, --channels_last, --compile) train, and keep the binarizers exact."""
import math
import re

import pytest
import torch

from conftest import run_script, train_args
from models import reactnet
from models.reactnet import BinaryConv2d
from utils.distill import distillation_loss


def logged_losses(output):
    return [float(v) for v in re.findall(r"Loss (\S+) \(", output)]


@pytest.mark.parametrize("flags", [["--amp", "bf16", "--channels_last"], ["--amp", "fp16"],
                                   ["--compile", "aot_eager", "--fused_optimizer"]])
def test_step2_trains_with_speed_flags(tiny_data, teacher_weights, tmp_path, flags):
    args = train_args(tiny_data, teacher_weights, tmp_path, "--step1_checkpoint", "none", *flags)
    result = run_script("step2/train.py", *args)
    assert result.returncode == 0, result.stderr
    losses = logged_losses(result.stdout)
    assert len(losses) >= 3 and all(math.isfinite(v) for v in losses)
    state = torch.load(tmp_path / "checkpoint.pth.tar", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert not any(k.startswith("_orig_mod.") for k in state["state_dict"])


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


def test_compiled_student_matches_eager_values_and_gradients():
    torch.manual_seed(0)
    eager = reactnet(4, binary_weights=True)
    compiled = torch.compile(eager, backend="aot_eager")
    images, teacher = torch.randn(2, 3, 32, 32), torch.randn(2, 4)
    results = []
    for model in (eager, compiled):
        model.zero_grad()
        loss = distillation_loss(model(images), teacher)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in eager.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b)
