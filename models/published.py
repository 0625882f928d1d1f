"""The binarizers computed the way the published implementation computes them.

Registered as the binarizers named ``published`` (``--act_binarizer published --weight_binarizer
published``); the baseline of ``python -m tools.benchmark`` and a second opinion in the tests. The published
code builds the surrogate gradient out of masks and the ``y.detach() - s.detach() + s`` trick, so
autograd keeps every intermediate of the polynomial; its weight scale is a mean of means of |W| and
its clip is an explicit clamp. Values and gradients agree with models/binarize.py up to rounding.
"""
import torch
import torch.nn as nn

from models.registry import register_act_binarizer, register_weight_binarizer


@register_act_binarizer("published")
def masked_polynomial_sign(x):
    """sign(x) forward; the polynomial of models.binarize.SignWithPolynomialGrad backward, by masks
    (Liu et al., ECCV 2020; forward and backward formulas in models/binarize.py)."""
    below_minus_one = (x < -1).float()
    below_zero = (x < 0).float()
    below_one = (x < 1).float()
    left = -1 * below_minus_one + (x * x + 2 * x) * (1 - below_minus_one)
    middle = left * below_zero + (-x * x + 2 * x) * (1 - below_zero)
    polynomial = middle * below_one + 1 * (1 - below_one)
    return torch.sign(x).detach() - polynomial.detach() + polynomial


class MaskedPolynomialSign(nn.Module):
    """``masked_polynomial_sign`` as a module."""

    def forward(self, x):
        return masked_polynomial_sign(x)


@register_weight_binarizer("published")
def nested_mean_clamped_sign(weight):
    """alpha * sign(W) forward with alpha a mean of means; clamp(W, -1, 1) straight-through backward
    (Rastegari et al., ECCV 2016; Liu et al., ECCV 2020; formulas in models/binarize.py)."""
    alpha = weight.abs().mean(dim=3, keepdim=True).mean(dim=2, keepdim=True).mean(dim=1, keepdim=True)
    binary = alpha.detach() * torch.sign(weight)
    clipped = torch.clamp(weight, -1.0, 1.0)
    return binary.detach() - clipped.detach() + clipped
