"""ReActNet-A (Liu et al., ECCV 2020): a MobileNetV1 backbone with binary activations.

Module names, parameter shapes and construction order follow the published implementation, so its
checkpoints load strictly and a seeded construction draws the same initial weights.
"""
import torch
import torch.nn as nn

from models.layers import BinaryActivation, BinaryConv2d, LearnableBias
from models.registry import register_architecture

STAGE_WIDTHS = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
# The stem and four widening blocks halve the resolution: a smaller input leaves no pixel for the last blocks.
MIN_INPUT_SIZE = 32


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

    def activation_inputs(self):
        """``(binary conv name, module)`` pairs whose output is what the next binarizer reads: the
        RSign shifts ``move11`` (before ``binary_3x3``) and ``move21`` (before the 1x1 conv(s),
        which share one binarized input), for the saturation measurement."""
        blocks = [(name, block) for name, block in self.named_modules() if isinstance(block, BasicBlock)]
        return ([(f"{name}.binary_3x3", block.move11) for name, block in blocks]
                + [(f"{name}.binary_pw", block.move21) for name, block in blocks])


@register_architecture("reactnet_a", title="ReActNet-A", downsampling=MIN_INPUT_SIZE, reported_costs={
    "bops": 4.82e9, "flops": 0.12e8, "ops": 0.87e8, "source": "ReActNet (ECCV 2020), Table 3"})
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
