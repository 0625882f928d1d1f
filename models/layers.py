"""Building blocks shared by the binary architectures: RSign's parts, the binary convolution and
the deterministic global pool. Each reads its binarizer from an attribute that ``set_binarizers``
sets, so a binarizer is chosen by name without touching a model.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.binarize import binarize_activation, binarize_weight
from models.registry import RegistryError, get_act_binarizer, get_weight_binarizer


class LearnableBias(nn.Module):
    """A per-channel shift, the ``move`` of RSign and RPReLU."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x):
        return x + self.bias


class BinaryActivation(nn.Module):
    """RSign's sign (the preceding LearnableBias is its threshold), computed by ``self.binarizer``
    (``--act_binarizer``). A module, so hooks can see the pre-binarization activations."""

    def __init__(self):
        super().__init__()
        self.binarizer = binarize_activation

    def forward(self, x):
        return self.binarizer(x)


class BinaryConv2d(nn.Conv2d):
    """A bias-free convolution that is fed binary activations.

    With ``binary_weights=False`` (step 1) the weights are real; with ``binary_weights=True``
    (step 2) the forward uses ``self.weight_binarizer(self.weight)`` (``--weight_binarizer``) and the latent weights start as
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


class GlobalMeanPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` written as a mean over height and width: the same values up to
    summation order, and a backward that CUDA computes deterministically (adaptive pooling's does
    not). Used under ``--deterministic`` on GPUs."""

    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


def use_deterministic_pooling(model):
    """Replaces, in place, every global ``AdaptiveAvgPool2d`` of ``model`` by a GlobalMeanPool."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
                setattr(parent, name, GlobalMeanPool())
    return model


def set_binarizers(model, act_binarizer, weight_binarizer):
    """Makes every BinaryActivation and BinaryConv2d of ``model`` use the named binarizers, in place.

    Raises:
        RegistryError: a tempered binarizer for a model whose binary modules hold no temperature.
    """
    act, weight = get_act_binarizer(act_binarizer), get_weight_binarizer(weight_binarizer)
    for module in model.modules():
        if isinstance(module, BinaryActivation):
            module.binarizer = fitting(act, module, "--act_binarizer", act_binarizer)
        elif isinstance(module, BinaryConv2d):
            module.weight_binarizer = fitting(weight, module, "--weight_binarizer", weight_binarizer)
    return model


def fitting(binarizer, module, flag, name):
    """``binarizer``, unless it reads a temperature that ``module`` does not hold."""
    if getattr(binarizer, "tempered", False) and "temperature" not in module._buffers:
        raise RegistryError(f"{flag} {name} reads a temperature that the {type(module).__name__} "
                            f"modules of this architecture do not hold: pick another {flag}")
    return binarizer


def binary_convs(model):
    """(name, module) of every BinaryConv2d in ``model``, in forward order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]
