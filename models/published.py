"""The binarizers computed the way the published implementation computes them.

Used as the baseline of ``python -m tools.benchmark`` and as a second opinion in the tests. The published
code builds the surrogate gradient out of masks and the ``y.detach() - s.detach() + s`` trick, so
autograd keeps every intermediate of the polynomial; its weight scale is a mean of means of |W| and
its clip is an explicit clamp. Values and gradients agree with models/binarize.py up to rounding.
"""
import torch
import torch.nn as nn

from .reactnet import BasicBlock, BinaryConv2d


class MaskedPolynomialSign(nn.Module):
    """sign(x) forward; the polynomial of models.binarize.SignWithPolynomialGrad backward, by masks."""

    def forward(self, x):
        below_minus_one = (x < -1).float()
        below_zero = (x < 0).float()
        below_one = (x < 1).float()
        left = -1 * below_minus_one + (x * x + 2 * x) * (1 - below_minus_one)
        middle = left * below_zero + (-x * x + 2 * x) * (1 - below_zero)
        polynomial = middle * below_one + 1 * (1 - below_one)
        return torch.sign(x).detach() - polynomial.detach() + polynomial


def nested_mean_clamped_sign(weight):
    """alpha * sign(W) forward with alpha a mean of means; clamp(W, -1, 1) straight-through backward."""
    alpha = weight.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
    binary = alpha.detach() * torch.sign(weight)
    clipped = torch.clamp(weight, -1.0, 1.0)
    return binary.detach() - clipped.detach() + clipped


def use_published_binarizers(model):
    """Swaps every binarizer of a ReActNet-A, in place, for the published formulation."""
    for module in model.modules():
        if isinstance(module, BasicBlock):
            module.binary_activation = MaskedPolynomialSign()
        elif isinstance(module, BinaryConv2d):
            module.weight_binarizer = nested_mean_clamped_sign
    return model
