"""Binarizers by name, written as autograd Functions.

``--act_binarizer``: ``polynomial`` (default, Bi-Real Net / ReActNet), ``ste`` (clipped
straight-through sign, BinaryNet). ``--weight_binarizer``: ``scaled_sign`` (default, XNOR-Net /
ReActNet), ``sign`` (unscaled clipped straight-through sign, BinaryNet). models/published.py adds
``published`` to both: the defaults computed the published code's way.

Each binarizer is one small ``torch.autograd.Function``: the forward is the sign, the backward is the
surrogate gradient written out in closed form. Compared with composing the surrogate from masks and
detach tricks, a Function keeps one tensor for backward instead of several, which matters because the
activation binarizer runs 26 times per forward pass of ReActNet-A.
"""
import torch

from models.registry import register_act_binarizer, register_weight_binarizer


class SavedSign(torch.autograd.Function):
    """``sign(x)`` forward (``torch.sign``, so 0 maps to 0), keeping ``x`` for a surrogate backward
    that subclasses define."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)


class SignWithPolynomialGrad(SavedSign):
    """Binary activation of Bi-Real Net / ReActNet (Liu et al., ECCV 2018 and ECCV 2020).

    Forward:  ``y = sign(x)`` (``torch.sign``, so 0 maps to 0).

    Backward: the derivative of the piecewise polynomial
    ``F(x) = -1 (x < -1); x^2 + 2x (-1 <= x < 0); -x^2 + 2x (0 <= x < 1); 1 (x >= 1)``, i.e.
    ``dy/dx = 2 + 2x`` on ``[-1, 0)``, ``2 - 2x`` on ``[0, 1)`` and 0 elsewhere, which is
    ``max(0, 2 - 2|x|)`` everywhere (it is 0 at ``|x| = 1`` and 2 at ``x = 0``).
    """

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (2 - 2 * x.abs()).clamp_min_(0)


class ScaledSignWithClipGrad(torch.autograd.Function):
    """Weight binarizer of XNOR-Net / ReActNet (Rastegari et al., ECCV 2016; Liu et al., ECCV 2020).

    Forward:  ``Wb = alpha * sign(W)`` with ``alpha[o] = mean(|W[o]|)`` over in-channels and kernel,
    one scale per output channel. The scale is computed in at least float32 precision.

    Backward: ``alpha`` is a constant and the sign is passed straight through a clip, i.e. the
    derivative of ``clamp(W, -1, 1)``: ``dWb/dW = 1`` where ``|W| <= 1`` and 0 elsewhere.
    """

    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        precise = weight.to(torch.promote_types(weight.dtype, torch.float32))
        alpha = precise.abs().mean(dim=tuple(range(1, weight.dim())), keepdim=True)
        return (alpha * torch.sign(weight)).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        return grad_output * (weight.abs() <= 1)


class SignWithClipGrad(SavedSign):
    """The straight-through sign of BinaryNet (Hubara, Courbariaux et al., NeurIPS 2016,
    "Binarized Neural Networks"), for activations and for weights alike.

    Forward:  ``y = sign(x)`` (``torch.sign``, so 0 maps to 0), no scale.

    Backward: the gradient passes where ``|x| <= 1`` and is cancelled elsewhere, i.e. the
    derivative of ``clamp(x, -1, 1)`` ("hard tanh"): ``dy/dx = 1`` on ``[-1, 1]``, 0 outside.
    """

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        return grad_output * (x.abs() <= 1)


@register_act_binarizer("polynomial")
def binarize_activation(x):
    """``sign(x)`` with the ReActNet polynomial surrogate gradient (see SignWithPolynomialGrad)."""
    return SignWithPolynomialGrad.apply(x)


@register_weight_binarizer("scaled_sign")
def binarize_weight(weight):
    """``mean|W| * sign(W)`` per output channel with the clipped straight-through gradient."""
    return ScaledSignWithClipGrad.apply(weight)


@register_act_binarizer("ste")
@register_weight_binarizer("sign")
def clipped_sign(x):
    """``sign(x)`` with the clipped straight-through gradient (see SignWithClipGrad)."""
    return SignWithClipGrad.apply(x)
