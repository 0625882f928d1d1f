"""The binarizers of models/binarize.py against their formulas.

Activation: forward sign(x) with sign(0) = 0; backward the derivative of F(x) = -1 (x < -1),
x^2 + 2x (-1 <= x < 0), -x^2 + 2x (0 <= x < 1), 1 (x >= 1). Weights: forward alpha * sign(W) with
alpha the mean |W| of each output channel; backward 1 where |W| <= 1, else 0.
"""
import pytest
import torch

from models.binarize import binarize_activation, binarize_weight
from models.published import MaskedPolynomialSign, nested_mean_clamped_sign

EPS = 1e-3


def polynomial_derivative(x):
    """dF/dx of the F above, one interval at a time: 2 + 2x on [-1, 0), 2 - 2x on [0, 1), else 0."""
    if -1 <= x < 0:
        return 2 + 2 * x
    if 0 <= x < 1:
        return 2 - 2 * x
    return 0.0


def output_and_grad(binarizer, x, upstream):
    """``binarizer(x)`` and the gradient it sends back to ``x`` for the upstream gradient."""
    x = x.detach().clone().requires_grad_(True)
    out = binarizer(x)
    out.backward(upstream)
    return out, x.grad


def activation_grad(x):
    return output_and_grad(binarize_activation, x, torch.ones_like(x))[1]


def weight_grad(weight, upstream):
    return output_and_grad(binarize_weight, weight, upstream)[1]


def per_channel_abs_mean(weight):
    return weight.double().abs().flatten(1).mean(1)


def assert_scaled_sign(out, weight, rtol):
    """Each output channel is +-alpha with alpha = mean|W| of that channel, signs those of W."""
    assert torch.equal(torch.sign(out), torch.sign(weight))
    magnitudes = out.abs().flatten(1)
    assert torch.equal(magnitudes, magnitudes[:, :1].expand_as(magnitudes))
    torch.testing.assert_close(magnitudes[:, 0].double(), per_channel_abs_mean(weight), rtol=rtol, atol=0)


def count_saved_tensors(function, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        function(x.detach().clone().requires_grad_(True))
    return saved


POINTS = [-5.0, -1 - EPS, -1.0, -1 + EPS, -0.5, -EPS, 0.0, EPS, 0.5, 1 - EPS, 1.0, 1 + EPS, 5.0, 1e6, -1e6]


def test_activation_forward_is_sign_with_zero_kept():
    x = torch.tensor(POINTS)
    expected = torch.tensor([(p > 0) - (p < 0) for p in POINTS], dtype=torch.float32)
    assert torch.equal(binarize_activation(x), expected)
    assert binarize_activation(torch.tensor([0.0])).item() == 0.0


@pytest.mark.parametrize("point", POINTS)
def test_activation_gradient_is_polynomial_derivative(point):
    grad = activation_grad(torch.tensor([point], dtype=torch.float64))
    assert grad.item() == pytest.approx(polynomial_derivative(point), abs=1e-12)


def test_activation_gradient_endpoints():
    grad = activation_grad(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    assert grad.tolist() == [0.0, 2.0, 0.0]


def test_activation_gradient_scales_upstream_gradient():
    x = torch.tensor([-0.25, 0.75, 3.0], dtype=torch.float64, requires_grad=True)
    upstream = torch.tensor([3.0, -2.0, 7.0], dtype=torch.float64)
    binarize_activation(x).backward(upstream)
    assert x.grad.tolist() == pytest.approx([3.0 * 1.5, -2.0 * 0.5, 0.0])


def test_weight_forward_is_per_channel_scaled_sign():
    torch.manual_seed(0)
    weight = torch.randn(8, 5, 3, 3)
    out = binarize_weight(weight)
    assert out.dtype == weight.dtype and out.shape == weight.shape
    assert_scaled_sign(out, weight, rtol=1e-6)


def test_weight_scale_is_per_output_channel_not_global():
    weight = torch.ones(2, 1, 1, 2)
    weight[1] *= -4
    assert binarize_weight(weight).flatten().tolist() == [1.0, 1.0, -4.0, -4.0]


def test_weight_gradient_passes_where_abs_at_most_one():
    weight = torch.tensor([-3.0, -1.0 - EPS, -1.0, -0.2, 0.0, 0.7, 1.0, 1.0 + EPS, 2.0]).reshape(1, 9, 1, 1)
    upstream = torch.arange(1.0, 10.0).reshape(1, 9, 1, 1)
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.float32).reshape(1, 9, 1, 1)
    assert torch.equal(weight_grad(weight, upstream), upstream * mask)


def test_weight_scale_is_constant_in_backward():
    # Were alpha differentiated, d(alpha)/dW = sign(W)/n would add a term coupling the channel.
    torch.manual_seed(1)
    weight = torch.randn(4, 3, 3, 3) * 0.5
    upstream = torch.randn(4, 3, 3, 3)
    expected = upstream * (weight.abs() <= 1)
    assert torch.equal(weight_grad(weight, upstream), expected)


def test_activation_agrees_with_published_formulation():
    torch.manual_seed(2)
    x = torch.randn(4, 6, 5, 5) * 1.5
    upstream = torch.randn_like(x)
    out_ours, grad_ours = output_and_grad(binarize_activation, x, upstream)
    out_published, grad_published = output_and_grad(MaskedPolynomialSign(), x, upstream)
    assert torch.equal(out_ours, out_published)
    torch.testing.assert_close(grad_ours, grad_published, rtol=1e-6, atol=1e-6)


def test_weight_binarizer_agrees_with_published_formulation():
    torch.manual_seed(3)
    weight = torch.randn(16, 8, 3, 3) * 0.8
    upstream = torch.randn_like(weight)
    out_ours, grad_ours = output_and_grad(binarize_weight, weight, upstream)
    out_published, grad_published = output_and_grad(nested_mean_clamped_sign, weight, upstream)
    torch.testing.assert_close(out_ours, out_published, rtol=1e-6, atol=0)
    assert torch.equal(grad_ours, grad_published)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_binarizer_in_low_precision(dtype):
    torch.manual_seed(4)
    weight = (torch.randn(32, 64, 3, 3) * 0.05).to(dtype)
    out = binarize_weight(weight)
    assert out.dtype == dtype
    assert_scaled_sign(out, weight, rtol=torch.finfo(dtype).eps)


def test_weight_binarizer_under_bf16_autocast():
    torch.manual_seed(5)
    weight = (torch.randn(16, 8, 3, 3) * 0.05).requires_grad_(True)
    x = torch.randn(2, 8, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        binary = binarize_weight(weight)
        out = torch.nn.functional.conv2d(x, binary, padding=1)
    assert out.dtype == torch.bfloat16
    assert_scaled_sign(binary.float(), weight.detach(), rtol=1e-6)
    out.float().sum().backward()
    assert weight.grad.dtype == torch.float32
    assert weight.grad.abs().sum() > 0


def test_activation_under_bf16_autocast_keeps_sign():
    x = torch.tensor([-2.0, -0.3, 0.0, 0.4, 9.0], dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = binarize_activation(x)
    assert out.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]


def test_activation_saves_one_tensor_for_backward():
    x = torch.randn(2, 4, 5, 5)
    saved = count_saved_tensors(binarize_activation, x)
    assert len(saved) == 1 and saved[0].shape == x.shape
    assert len(count_saved_tensors(MaskedPolynomialSign(), x)) > 1


def test_weight_binarizer_saves_one_tensor_for_backward():
    weight = torch.randn(8, 4, 3, 3)
    saved = count_saved_tensors(binarize_weight, weight)
    assert len(saved) == 1 and saved[0].shape == weight.shape
    assert len(count_saved_tensors(nested_mean_clamped_sign, weight)) > 1
