"""BNext (Guo, Bethge, Meinel, Yang, "Join the High Accuracy Club on ImageNet with a Binary Neural
Network Ticket", arXiv 2211.12933, 2022): ``bnext_tiny``, ``bnext_small``, ``bnext_middle`` and
``bnext_large``, with their binarizers ``bnext_sign`` and ``bnext_weight``.

- Stem (``feature.0``), real: 3x3 conv (stride 2 at 1000 classes, else 1), BatchNorm. Its PReLU is
  in the published state_dict but not applied.
- ``feature.i`` (i >= 1) maps ``widths[i-1]`` to ``widths[i]`` channels, with stride 2 where the
  width changes, except into ``widths[1]``. A block is a 3x3 unit named ``Attention`` (the
  ELM-attention unit in even blocks, the plain 3x3 unit in odd ones), then one 1x1 unit ``FFN``, or,
  where the width doubles, two 1x1 units ``FFN_1`` and ``FFN_2`` on the same input whose outputs are
  concatenated.
- A unit: learnable shift ``move``, binary activation, binary conv, BatchNorm ``norm1``, PReLU
  ``activation2``, then information recoupling and BatchNorm ``norm2`` around a shortcut (BinaryUnit).
- Head: PReLU, global average pool, fc.

The binarizers carry a ``temperature`` buffer each, multiplied by 0.9 before every epoch but the
first (``BNext.start_epoch``): the weights pass from ``clamp(W / T, -1, 1)`` to signs as it falls.

Module names, shapes and construction order follow the published definition, so its released
files load strictly and a seeded construction draws the same initial weights.
"""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.layers import BinaryActivation, BinaryConv2d, LearnableBias
from models.registry import register_act_binarizer, register_architecture, register_weight_binarizer

STAGE_WIDTHS = {
    "tiny": [32] + [64] + [128] * 2 + [256] * 2 + [512] * 6 + [1024] * 2,
    "small": [48] + [96] + [192] * 2 + [384] * 2 + [768] * 6 + [1536] * 2,
    "middle": [48] + [96] + [192] * 4 + [384] * 4 + [768] * 8 + [1536] * 4,
    "large": [64] + [128] + [256] * 4 + [512] * 4 + [1024] * 16 + [2048] * 4,
}
TITLES = {"tiny": "BNext-T", "small": "BNext-S", "middle": "BNext-M", "large": "BNext-L"}

ACTIVATION_RANGE = 1.5  # the activation's straight-through window
WEIGHT_RANGE = 1.5  # the latent weights' clamp in training
MIN_TEMPERATURE = 1e-8  # the divisor's floor
SIGN_TEMPERATURE = 1e-7  # below it the weights are signs
TEMPERATURE_DECAY = 0.9  # per epoch
INITIAL_WEIGHT_STD = 0.001
SE_REDUCTION = 8
INITIAL_SCALE = 0.5  # information recoupling's share of the unit's input


# --- Binarizers ---

class TemperedSignWithClipGrad(torch.autograd.Function):
    """BNext's activation binarizer (``HardSign`` with range [-1.5, 1.5]).

    Forward: ``sign(clamp(x / max(T, 1e-8), -1, 1))`` (``torch.sign``: 0 maps to 0), which is
    ``sign(x)`` for any positive temperature short of over- or underflow. (The published code
    computes ``(s - c) + c`` with ``c = clamp(x, -1.5, 1.5)``, which rounds back to ``s`` exactly.)

    Backward: the straight-through gradient of ``clamp(x, -1.5, 1.5)`` as PyTorch computes it: the
    upstream gradient where ``|x| < 1.5``, 0 elsewhere (also at exactly +-1.5); none to the
    temperature. One tensor is kept for it.
    """

    @staticmethod
    def forward(ctx, x, temperature):
        ctx.save_for_backward(x)
        return torch.sign(torch.clamp(x / temperature.clamp(min=MIN_TEMPERATURE), -1, 1))

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return torch.where(x.abs() < ACTIVATION_RANGE, grad_output, 0), None


def progressive_weights(weight, temperature):
    """``sign(W)`` when ``T < 1e-7``, else ``clamp(W / max(T, 1e-8), -1, 1)``: not binary while
    the temperature is large. Differentiable as written (the gradient BNext's eval mode gives)."""
    return torch.where(temperature < SIGN_TEMPERATURE, torch.sign(weight),
                       torch.clamp(weight / temperature.clamp(min=MIN_TEMPERATURE), -1, 1))


class ProgressiveWeightsWithIdentityGrad(torch.autograd.Function):
    """BNext's weight binarizer in training (``HardBinaryConv``).

    Forward: ``progressive_weights(W, T)``, no scaling factor, computed as the published
    ``b.detach() - W.detach() + W`` is, ``(b - W) + W``: while the weights are not signs this misses
    ``b`` by an ulp here and there, and the published numerics follow from those values. Backward:
    the identity to ``W``.
    """

    @staticmethod
    def forward(ctx, weight, temperature):
        return progressive_weights(weight, temperature) - weight + weight

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, None


@register_act_binarizer("bnext_sign", tempered=True, saturates_beyond=ACTIVATION_RANGE)
def bnext_sign(x, temperature, training):
    """BNext's binary activation, the same in training and evaluation (TemperedSignWithClipGrad)."""
    return TemperedSignWithClipGrad.apply(x, temperature)


@register_weight_binarizer("bnext_weight", tempered=True)
def bnext_weight(weight, temperature, training):
    """BNext's weights: ``progressive_weights`` forward; in training the identity backward
    (ProgressiveWeightsWithIdentityGrad), in evaluation the gradient of the formula itself."""
    if training:
        return ProgressiveWeightsWithIdentityGrad.apply(weight, temperature)
    return progressive_weights(weight, temperature)


def binarize(binarizer, x, module):
    """``binarizer(x)``, or for a tempered one ``binarizer(x, module.temperature, module.training)``."""
    if getattr(binarizer, "tempered", False):
        return binarizer(x, module.temperature, module.training)
    return binarizer(x)


class HardSign(BinaryActivation):
    """A binary activation with its ``temperature`` buffer (initial 1)."""

    def __init__(self):
        super().__init__()
        self.binarizer = bnext_sign
        self.register_buffer("temperature", torch.ones(1))

    def forward(self, x):
        return binarize(self.binarizer, x, self)


class HardBinaryConv(BinaryConv2d):
    """A binary convolution with its ``temperature`` buffer (initial 1) and BNext's initial
    weights, normal with std 0.001 in both steps. With binary weights, training first clamps the
    latent weights to [-1.5, 1.5] in place (the weight binarizer's identity backward lets them
    grow otherwise); with real weights (step 1) it neither binarizes nor clamps."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, binary_weights):
        super().__init__(in_channels, out_channels, kernel_size, stride, binary_weights)
        self.weight_binarizer = bnext_weight
        self.register_buffer("temperature", torch.ones(1))

    def reset_parameters(self):
        with torch.no_grad():
            self.weight.copy_(torch.randn(self.weight.shape) * INITIAL_WEIGHT_STD)

    def forward(self, x):
        weight = self.weight
        if self.binary_weights:
            if self.training:
                self.weight.data.clamp_(-WEIGHT_RANGE, WEIGHT_RANGE)
            weight = binarize(self.weight_binarizer, weight, self)
        return F.conv2d(x, weight, None, self.stride, self.padding)


# --- Network ---

class SqueezeAndExpand(nn.Module):
    """Channel attention: global average pool, 1x1 conv (C -> C/8, with bias), ReLU, 1x1 conv
    (C/8 -> C, with bias), sigmoid."""

    def __init__(self, channels):
        super().__init__()
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                nn.Conv2d(channels, channels // SE_REDUCTION, 1),
                                nn.ReLU(),
                                nn.Conv2d(channels // SE_REDUCTION, channels, 1))

    def forward(self, x):
        return torch.sigmoid(self.se(x))


class BinaryUnit(nn.Module):
    """One binary conv with its shortcut: ``Attention`` (3x3) or ``FFN*`` (1x1) of a block.

    ``x = PReLU2(BN1(conv(sign(move(input)))))``; then information recoupling: ``scale`` (one
    share per channel, initial 0.5, clamped in place to [0, 1]) mixes the input into the
    attention's input, ``x = SE(scale * input + (1 - scale) * x) * x``, the input average-pooled 2x2
    where the unit has stride 2. The shortcut is the (pooled) input, except in the ELM-attention unit:
    ``PReLU1(input)`` (pooled), which also multiplies ``x`` before ``BN2``. Output ``BN2(x) + shortcut``.

    ``activation1`` exists in every unit, as published, and only the ELM-attention unit applies it.
    The 3x3 units clamp ``scale`` in training only, the 1x1 units also in evaluation, as published.
    """

    def __init__(self, channels, kernel_size, stride, elm_attention, binary_weights):
        super().__init__()
        self.kernel_size, self.stride, self.elm_attention = kernel_size, stride, elm_attention
        self.move = LearnableBias(channels)
        self.binary_activation = HardSign()
        self.binary_conv = HardBinaryConv(channels, channels, kernel_size, stride, binary_weights)
        self.norm1 = nn.BatchNorm2d(channels)
        self.norm2 = nn.BatchNorm2d(channels)
        self.activation1 = nn.PReLU(channels)
        self.activation2 = nn.PReLU(channels)
        if stride == 2:
            self.pooling = nn.AvgPool2d(2, 2)
        self.se = SqueezeAndExpand(channels)
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1) * INITIAL_SCALE)

    def forward(self, input):
        # In the published order, which fixes the order in which backward sums the input's gradients.
        shortcut = self.activation1(input) if self.elm_attention else input
        if self.stride == 2:
            shortcut = self.pooling(shortcut)
        x = self.activation2(self.norm1(self.binary_conv(self.binary_activation(self.move(input)))))
        if self.training or self.kernel_size == 1:
            self.scale.data.clamp_(0, 1)
        if self.stride == 2:
            input = self.pooling(input)
        x = self.se(self.scale * input + (1 - self.scale) * x) * x
        if self.elm_attention:
            x = x * shortcut
        return self.norm2(x) + shortcut


class Block(nn.Module):
    """A 3x3 unit ``Attention`` (ELM-attention or plain), then the 1x1 unit ``FFN``, or where the
    width doubles ``FFN_1`` and ``FFN_2``, each from ``inplanes`` to ``inplanes`` channels, whose
    outputs are concatenated."""

    def __init__(self, inplanes, planes, stride, elm_attention, binary_weights):
        super().__init__()
        if planes not in (inplanes, 2 * inplanes):
            raise ValueError(f"a block maps C channels to C or 2C, not {inplanes} to {planes}")
        self.widening = planes != inplanes
        self.Attention = BinaryUnit(inplanes, 3, stride, elm_attention, binary_weights)
        if not self.widening:
            self.FFN = BinaryUnit(inplanes, 1, 1, False, binary_weights)
        else:
            self.FFN_1 = BinaryUnit(inplanes, 1, 1, False, binary_weights)
            self.FFN_2 = BinaryUnit(inplanes, 1, 1, False, binary_weights)

    def forward(self, input):
        x = self.Attention(input)
        if not self.widening:
            return self.FFN(x)
        return torch.cat((self.FFN_1(x), self.FFN_2(x)), dim=1)


class Stem(nn.Module):
    """Real 3x3 conv and BatchNorm. ``prelu`` is kept for the published state_dict (with its
    published initial slope, the channel count) and not applied."""

    def __init__(self, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.prelu = nn.PReLU(channels, init=float(channels))

    def forward(self, x):
        return self.bn1(self.conv1(x))


class BNext(nn.Module):
    """``feature[0]`` the stem, ``feature[1:]`` the blocks, then PReLU, pool and ``fc``."""

    def __init__(self, widths, num_classes=1000, binary_weights=False):
        super().__init__()
        self.binary_weights = binary_weights
        # The published definition keeps the full resolution for other datasets (CIFAR).
        self.feature = nn.ModuleList([Stem(widths[0], 2 if num_classes == 1000 else 1)])
        for i in range(1, len(widths)):
            stride = 2 if widths[i - 1] != widths[i] and widths[i] != widths[1] else 1
            self.feature.append(Block(widths[i - 1], widths[i], stride, i % 2 == 0, binary_weights))
        self.prelu = nn.PReLU(widths[-1])
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        for block in self.feature:
            x = block(x)
        return self.fc(torch.flatten(self.pool1(self.prelu(x)), 1))

    def temperatures(self):
        """The ``temperature`` buffers of every binary activation and conv."""
        return [m.temperature for m in self.modules() if isinstance(m, (HardSign, HardBinaryConv))]

    @torch.no_grad()
    def start_epoch(self, epoch):
        """BNext's temperature schedule: every temperature times 0.9 before each epoch but the
        first, so that epoch ``e`` of a run trains at ``0.9 ** e`` times its initial temperature
        (the published code multiplies after saving each epoch's checkpoint)."""
        if epoch > 0:
            for temperature in self.temperatures():
                temperature.mul_(TEMPERATURE_DECAY)

    def epoch_record(self):
        """The temperature the epoch ran at (the largest, should a file have set them apart)."""
        return {"temperature": max(t.item() for t in self.temperatures())}


def bnext(size, num_classes=1000, binary_weights=False):
    """Builds BNext of ``size`` (tiny, small, middle, large).

    Args:
        num_classes: classifier outputs; other than 1000, the stem keeps the resolution.
        binary_weights: False for real weights (step 1: the weight binarizer off), True for the
            weight binarizer on (step 2, and BNext's own one-step recipe). Same state_dict.
    """
    return BNext(STAGE_WIDTHS[size], num_classes, binary_weights)


# BNext's binarizers and its evaluation transform: timm's, bicubic resize to floor(S / 0.95), then a
# centre crop.
DEFAULTS = {"act_binarizer": "bnext_sign", "weight_binarizer": "bnext_weight",
            "interpolation": "bicubic", "crop_pct": 0.95, "resize_rounding": "floor"}

for _size, _title in TITLES.items():
    # Stem and four stride-2 stages at 1000 classes: the input is taken down by 32.
    register_architecture(f"bnext_{_size}", title=_title, downsampling=32, defaults=DEFAULTS)(
        functools.partial(bnext, _size))
