"""A new binary architecture and a new binarizer in one file, as a model is added to this repository.

The same file works in either place, with no other file edited:

- copied into models/, it is found when the models package is imported (every module there is);
- named in ``BNN_PLUGINS`` (paths or module names, separated by ``:``), it is imported before any
  architecture or binarizer is looked up.

It imports what it builds on by absolute names (``from models.layers import ...``), as a file in
models/ must for the second use to work. The tests use it both ways (tests/test_plugins.py).
"""
import torch
import torch.nn as nn

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


# Its own defaults: what it trains and evaluates with unless a flag or a checkpoint says otherwise.
TOY_DEFAULTS = {"act_binarizer": "toy_heaviside", "interpolation": "bicubic", "crop_pct": 0.9}


@register_architecture("toy_net", title="ToyNet", downsampling=4, defaults=TOY_DEFAULTS)
def toy_net(num_classes, binary_weights):
    return ToyNet(num_classes, binary_weights)
