"""A new architecture and a new binarizer as a plugin: this file defines and registers both, and the
real command lines use them once ``BNN_PLUGINS`` names this file, with no other file touched.

Imported by pytest as a test module, and by every command below as the plugin.
"""
import os

import torch
import torch.nn as nn
from conftest import (evaluate_args, last_val_line, run_script, run_tool, single_error_line, succeeded,
                      train_args)

from models.checkpoint import model_from_checkpoint
from models.layers import BinaryActivation, BinaryConv2d, LearnableBias
from models.registry import register_act_binarizer, register_architecture, register_weight_binarizer


class HeavisideWithIdentityGrad(torch.autograd.Function):
    """Toy binarizer. Forward: 1 where x > 0, else 0. Backward: the gradient unchanged."""

    @staticmethod
    def forward(ctx, x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


@register_act_binarizer("toy_heaviside")
@register_weight_binarizer("toy_heaviside")
def toy_heaviside(x):
    return HeavisideWithIdentityGrad.apply(x)


class ToyNet(nn.Module):
    """Real 3x3 stride-2 stem, one binary 3x3 stride-2 conv with RSign, global pool, fc."""

    def __init__(self, num_classes, binary_weights):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.move = LearnableBias(8)
        self.binary_activation = BinaryActivation()
        self.binary_conv = BinaryConv2d(8, 16, 3, 2, binary_weights)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.bn(self.binary_conv(self.binary_activation(self.move(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


@register_architecture("toy_net", title="ToyNet", downsampling=4)
def toy_net(num_classes, binary_weights):
    return ToyNet(num_classes, binary_weights)


PLUGIN = {"BNN_PLUGINS": os.path.abspath(__file__)}


def test_toy_architecture_and_binarizer_through_every_command(tiny_data, teacher_weights, tmp_path):
    step1, step2 = str(tmp_path / "step1"), str(tmp_path / "step2")
    # Step 1 for 2 epochs (epoch 0 trains at lr / 2), then resumed for a third without naming the
    # model again: the architecture and binarizer come from the checkpoint.
    succeeded(run_script("step1/train.py", *train_args(tiny_data, teacher_weights, step1, "--arch", "toy_net",
                                                      "--act_binarizer", "toy_heaviside", epochs=2),
                         env=PLUGIN))
    resumed = succeeded(run_script("step1/train.py", *train_args(tiny_data, teacher_weights, step1,
                                                                 "--resume_with_changes", epochs=3), env=PLUGIN))
    assert "=> resuming" in resumed.stdout and "=> step 1: ToyNet, 3 classes" in resumed.stdout
    saved = torch.load(os.path.join(step1, "checkpoint.pth.tar"), weights_only=True)
    assert (saved["epoch"], saved["arch"], saved["act_binarizer"]) == (3, "toy_net", "toy_heaviside")

    # Step 2 from step 1, again without naming the model; its weights binarized by the toy too.
    succeeded(run_script("step2/train.py", *train_args(tiny_data, teacher_weights, step2, "--weight_binarizer",
                                                      "toy_heaviside", "--step1_checkpoint",
                                                      os.path.join(step1, "model_best.pth.tar"), epochs=2),
                         env=PLUGIN))
    best = os.path.join(step2, "model_best.pth.tar")
    model, step = model_from_checkpoint(best)
    assert (step, model.spec.arch, model.spec.act_binarizer, model.spec.weight_binarizer) == \
        (2, "toy_net", "toy_heaviside", "toy_heaviside")
    assert model.binary_activation.binarizer is toy_heaviside and model.binary_conv.weight_binarizer is toy_heaviside

    evaluated = succeeded(run_script("evaluate.py", *evaluate_args(tiny_data, best), env=PLUGIN))
    assert "(ToyNet) as step 2" in evaluated.stdout
    assert last_val_line(evaluated.stdout)

    # OPs: the binary conv reads 8x16x16 and writes 16x8x8 (3x3 kernel); the stem and fc are real.
    summary = succeeded(run_tool("summary", "--checkpoint", best, "--image_size", 32, env=PLUGIN))
    assert summary.stdout.startswith("ToyNet, step 2 (binary weights), 3 classes, 32x32 input\n")
    totals = {line.split(":")[0]: line.split()[1] for line in summary.stdout.splitlines()[-5:]}
    assert totals["BOPs"] == f"{16 * 8 * 8 * 8 * 9:,}"
    assert totals["FLOPs"] == f"{8 * 16 * 16 * 3 * 9 + 16 * 3:,}"

    # Without the plugin the names cannot be resolved, and the command says how to fix it.
    line = single_error_line(run_script("evaluate.py", *evaluate_args(tiny_data, best)))
    assert "unknown architecture 'toy_net'" in line and "BNN_PLUGINS" in line
