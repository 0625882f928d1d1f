"""ReActNet-A (Liu et al., ECCV 2020): a MobileNetV1 backbone with binary activations.

Module names, parameter shapes and construction order follow the published implementation, so its
checkpoints load strictly and a seeded construction draws the same initial weights.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .binarize import binarize_activation, binarize_weight

STAGE_WIDTHS = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
# Five stride-2 stages take the input down by 32: a smaller image leaves no pixel for the last blocks.
MIN_INPUT_SIZE = 32


class LearnableBias(nn.Module):
    """A per-channel shift, the ``move`` of RSign and RPReLU."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


class BinaryActivation(nn.Module):
    """RSign's sign (the preceding LearnableBias is its threshold). A module, so hooks can see
    the pre-binarization activations and the binarizer can be swapped for comparisons."""

    def forward(self, x):
        return binarize_activation(x)


class BinaryConv2d(nn.Conv2d):
    """A bias-free convolution that is fed binary activations.

    With ``binary_weights=False`` (step 1) the weights are real; with ``binary_weights=True``
    (step 2) the forward uses ``binarize_weight(self.weight)`` and the latent weights start as
    ``uniform[0, 1) * 0.001``, as in the published step-2 model.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, binary_weights=False):
        # Set before nn.Conv2d.__init__, which calls reset_parameters.
        self.binary_weights = binary_weights
        self.weight_binarizer = binarize_weight
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2, bias=False)

    def reset_parameters(self):
        if not self.binary_weights:
            return super().reset_parameters()
        with torch.no_grad():
            self.weight.copy_(torch.rand(self.weight.shape) * 0.001)

    def forward(self, x):
        weight = self.weight_binarizer(self.weight) if self.binary_weights else self.weight
        return F.conv2d(x, weight, None, self.stride, self.padding)

    def extra_repr(self):
        return super().extra_repr() + f", binary_weights={self.binary_weights}"


class Stem(nn.Module):
    """Real 3x3 stride-2 convolution and BatchNorm, no activation."""

    def __init__(self, out_channels):
        super().__init__()
        self.conv1 = nn.Conv2d(3, out_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return self.bn1(self.conv1(x))


class BasicBlock(nn.Module):
    """Binary 3x3 conv and binary 1x1 conv(s), each with a shortcut and an RPReLU.

    When ``planes == 2 * inplanes`` the 1x1 conv is two ``inplanes -> inplanes`` convs whose
    outputs (each plus the shortcut) are concatenated, so every shortcut is an identity (or a 2x2
    average pool when the block downsamples).
    """

    def __init__(self, inplanes, planes, stride, binary_weights):
        super().__init__()
        if planes not in (inplanes, 2 * inplanes):
            raise ValueError(f"a block maps C channels to C or 2C, not {inplanes} to {planes}")
        self.stride = stride
        self.widening = planes != inplanes
        self.move11 = LearnableBias(inplanes)
        self.binary_3x3 = BinaryConv2d(inplanes, inplanes, 3, stride, binary_weights)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.move12 = LearnableBias(inplanes)
        self.prelu1 = nn.PReLU(inplanes)
        self.move13 = LearnableBias(inplanes)
        self.move21 = LearnableBias(inplanes)
        if not self.widening:
            self.binary_pw = BinaryConv2d(inplanes, planes, 1, 1, binary_weights)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.binary_pw_down1 = BinaryConv2d(inplanes, inplanes, 1, 1, binary_weights)
            self.binary_pw_down2 = BinaryConv2d(inplanes, inplanes, 1, 1, binary_weights)
            self.bn2_1 = nn.BatchNorm2d(inplanes)
            self.bn2_2 = nn.BatchNorm2d(inplanes)
        self.move22 = LearnableBias(planes)
        self.prelu2 = nn.PReLU(planes)
        self.move23 = LearnableBias(planes)
        self.binary_activation = BinaryActivation()
        if stride == 2:
            self.pooling = nn.AvgPool2d(2, 2)

    def forward(self, x):
        out1 = self.bn1(self.binary_3x3(self.binary_activation(self.move11(x))))
        shortcut = self.pooling(x) if self.stride == 2 else x
        out1 = self.move13(self.prelu1(self.move12(out1 + shortcut)))

        binary = self.binary_activation(self.move21(out1))
        if not self.widening:
            out2 = self.bn2(self.binary_pw(binary)) + out1
        else:
            out2 = torch.cat([self.bn2_1(self.binary_pw_down1(binary)) + out1,
                              self.bn2_2(self.binary_pw_down2(binary)) + out1], dim=1)
        return self.move23(self.prelu2(self.move22(out2)))


class GlobalMeanPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` written as a mean over height and width: the same values up to
    summation order, and a backward that CUDA computes deterministically (adaptive pooling's does
    not). Used under ``--deterministic`` on GPUs."""

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


class ReActNet(nn.Module):
    """ReActNet-A. ``feature[0]`` is the stem, ``feature[1:]`` the 13 binary blocks."""

    def __init__(self, num_classes=1000, binary_weights=False):
        super().__init__()
        self.binary_weights = binary_weights
        self.feature = nn.ModuleList([Stem(STAGE_WIDTHS[0])])
        for inplanes, planes in zip(STAGE_WIDTHS[:-1], STAGE_WIDTHS[1:]):
            # Every widening block halves the resolution except the first (32 -> 64).
            stride = 2 if planes != inplanes and planes != 64 else 1
            self.feature.append(BasicBlock(inplanes, planes, stride, binary_weights))
        self.pool1 = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x):
        for block in self.feature:
            x = block(x)
        return self.fc(torch.flatten(self.pool1(x), 1))


def reactnet(num_classes=1000, binary_weights=False):
    """Builds ReActNet-A.

    Args:
        num_classes: size of the classifier output.
        binary_weights: False for the step-1 network (binary activations, real weights), True for
            the step-2 network (binary activations and weights). Both have the same state_dict.

    Returns:
        A ``ReActNet`` module.
    """
    return ReActNet(num_classes=num_classes, binary_weights=binary_weights)


def binary_convs(model):
    """(name, module) of every BinaryConv2d in ``model``, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]
