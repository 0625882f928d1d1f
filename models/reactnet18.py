"""ReActNet-18 (Liu et al., ECCV 2020, arXiv 2003.03488): the Bi-Real Net ResNet-18 (Liu et al.,
ECCV 2018, arXiv 1808.00278) with RSign and RPReLU, the ResNet-18 BNN of AdamBNN's Table 1.

- Stem, real: 7x7 stride-2 conv (3 -> 64), BatchNorm, 3x3 stride-2 max pool (ResNet-18's stem,
  kept real by Bi-Real Net).
- Four stages of widths 64, 128, 256, 512, each of four blocks; the first block of stages 2-4
  halves the resolution. A block is ONE binary 3x3 conv with its own shortcut (Bi-Real Net's
  "a shortcut around every binary convolution": ResNet-18's 8 two-conv blocks become 16).
- A block: RSign (``move0`` shift, sign), binary 3x3 conv, BatchNorm, plus the shortcut, then RPReLU
  (``move1`` shift, PReLU, ``move2`` shift) as ReActNet adds to Bi-Real Net's block.
- Where a block changes width or resolution the shortcut is real: 2x2 average pool, 1x1 conv,
  BatchNorm (Bi-Real Net's downsampling shortcut, which keeps that path real-valued).
- Head, real: global average pool and fc (512 -> classes).

Module names follow the authors' ResNet-based ReActNet code (``layer1.0.binary_conv``...).
"""
import torch
import torch.nn as nn

from models.layers import BinaryActivation, BinaryConv2d, LearnableBias
from models.registry import register_architecture

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 4
STEM_WIDTH = 64


class BiRealBlock(nn.Module):
    """RSign, a binary 3x3 conv and BatchNorm, plus a shortcut, then RPReLU."""

    def __init__(self, inplanes, planes, stride, binary_weights):
        super().__init__()
        self.move0 = LearnableBias(inplanes)
        self.binary_activation = BinaryActivation()
        self.binary_conv = BinaryConv2d(inplanes, planes, 3, stride, binary_weights)
        self.bn1 = nn.BatchNorm2d(planes)
        self.move1 = LearnableBias(planes)
        self.prelu = nn.PReLU(planes)
        self.move2 = LearnableBias(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.AvgPool2d(2, stride),
                                            nn.Conv2d(inplanes, planes, 1, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn1(self.binary_conv(self.binary_activation(self.move0(x))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.move2(self.prelu(self.move1(out + shortcut)))


class ReActNet18(nn.Module):
    """Stem, ``layer1`` .. ``layer4`` (four BiRealBlocks each), global pool, ``fc``."""

    def __init__(self, num_classes=1000, binary_weights=False):
        super().__init__()
        self.binary_weights = binary_weights
        self.conv1 = nn.Conv2d(3, STEM_WIDTH, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM_WIDTH)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = STEM_WIDTH
        for index, planes in enumerate(STAGE_WIDTHS):
            blocks = []
            for b in range(BLOCKS_PER_STAGE):
                stride = 2 if b == 0 and index > 0 else 1
                blocks.append(BiRealBlock(inplanes, planes, stride, binary_weights))
                inplanes = planes
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# Stem conv, max pool and three stride-2 stages: the input is taken down by 32.
# Bi-Real Net reports the topology's cost; ReActNet gives its ResNet-based network the same OPs.
@register_architecture("reactnet_18", title="ReActNet-18", downsampling=32, reported_costs={
    "bops": 1.68e9, "flops": 1.39e8, "ops": 1.63e8,
    "source": "Bi-Real Net (ECCV 2018) for ResNet-18; ReActNet (ECCV 2020): the same OPs"})
def reactnet_18(num_classes=1000, binary_weights=False):
    """Builds ReActNet-18 for step 1 (``binary_weights=False``) or step 2 (True); both steps have
    the same state_dict."""
    return ReActNet18(num_classes=num_classes, binary_weights=binary_weights)
