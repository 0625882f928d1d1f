"""BNext of models/bnext.py against the published facts: its state_dict and parameter counts, and
its numerics against references written here from the published definition (binarizers element
by element, units, blocks and the whole network, forward and backward, in training and evaluation,
at several temperatures)."""
import ast
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from models import RunSpec, build_model
from models.spec import architecture_defaults
from models.bnext import BNext, Block, BinaryUnit, HardBinaryConv, HardSign, bnext_sign, bnext_weight
from models.registry import RegistryError, get_architecture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TSV = os.path.join(REPO, "tests", "bnext_tiny_state_dict.tsv")

# The published definition's figures (1000 classes).
PARAMETERS = {"tiny": 30_862_236, "small": 68_594_614, "middle": 134_501_974, "large": 326_546_640}
WIDTHS = {
    "tiny": [32] + [64] + [128] * 2 + [256] * 2 + [512] * 6 + [1024] * 2,
    "small": [48] + [96] + [192] * 2 + [384] * 2 + [768] * 6 + [1536] * 2,
    "middle": [48] + [96] + [192] * 4 + [384] * 4 + [768] * 8 + [1536] * 4,
    "large": [64] + [128] + [256] * 4 + [512] * 4 + [1024] * 16 + [2048] * 4,
}
TEMPERATURES = [1.0, 0.3, 1.1e-7, 9e-8, 0.0]
BN_EPS, BN_MOMENTUM = 1e-5, 0.1


# --- The published layout ---

def read_tsv():
    with open(TINY_TSV) as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [(name, tuple(ast.literal_eval(shape)), getattr(torch, dtype)) for name, shape, dtype in rows]


def bnext_spec(arch, num_classes, binary_weights, **fields):
    """The RunSpec of ``arch`` with its own defaults (its binarizers), as training and the tools
    resolve it."""
    return replace(architecture_defaults(arch), num_classes=num_classes, step=2 if binary_weights else 1,
                   **fields)


@pytest.mark.parametrize("binary_weights", [False, True])
def test_tiny_state_dict_equals_the_published_one(binary_weights):
    model = build_model(bnext_spec("bnext_tiny", 1000, binary_weights))
    assert [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()] == read_tsv()
    assert len(read_tsv()) == 661


@pytest.mark.parametrize("size", sorted(PARAMETERS))
def test_parameter_count_and_naming_of_every_size(size):
    with torch.device("meta"):
        model = build_model(bnext_spec(f"bnext_{size}", 1000, True))
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[size]
    # Every block is named as tiny's block of the same kind (widening or not).
    tiny = build_model(bnext_spec("bnext_tiny", 1000, True)).state_dict()

    def block_keys(keys, index):
        return sorted(k.split(".", 2)[2] for k in keys if k.startswith(f"feature.{index}."))
    widths = WIDTHS[size]
    keys = list(model.state_dict())
    for i in range(1, len(widths)):
        like = 1 if widths[i] != widths[i - 1] else 3  # tiny's feature.1 widens, feature.3 does not
        assert block_keys(keys, i) == block_keys(tiny, like)
    assert len(keys) == 7 + sum(63 if widths[i] != widths[i - 1] else 42 for i in range(1, len(widths))) + 3


@pytest.mark.parametrize("size", sorted(PARAMETERS))
def test_blocks_follow_the_published_strides_and_mixers(size):
    # Stride 2 where the width changes except into widths[1]; "scale" mixer (ELM attention) in even
    # blocks, "bias" (plain 3x3) in odd ones; the stem halves the resolution only at 1000 classes.
    widths = WIDTHS[size]
    with torch.device("meta"):
        model = build_model(bnext_spec(f"bnext_{size}", 1000, True))
        other = build_model(bnext_spec(f"bnext_{size}", 10, True))
    for i, block in enumerate(model.feature[1:], start=1):
        stride = 2 if widths[i - 1] != widths[i] and widths[i] != widths[1] else 1
        assert (block.Attention.stride, block.Attention.elm_attention) == (stride, i % 2 == 0)
        assert block.Attention.binary_conv.kernel_size == (3, 3)
        units = [block.FFN] if widths[i] == widths[i - 1] else [block.FFN_1, block.FFN_2]
        assert all(u.binary_conv.kernel_size == (1, 1) and u.stride == 1 for u in units)
    assert model.feature[0].conv1.stride == (2, 2) and other.feature[0].conv1.stride == (1, 1)
    assert get_architecture(f"bnext_{size}").title == f"BNext-{size[0].upper()}"


def test_defaults_name_its_binarizers_and_other_binarizers_still_apply():
    model = build_model(bnext_spec("bnext_tiny", 10, True))
    assert (model.spec.act_binarizer, model.spec.weight_binarizer) == ("bnext_sign", "bnext_weight")
    assert all(m.binarizer is bnext_sign for m in model.modules() if isinstance(m, HardSign))
    assert all(m.weight_binarizer is bnext_weight for m in model.modules() if isinstance(m, HardBinaryConv))
    # An untempered binarizer runs in BNext's modules; a tempered one has no temperature in ReActNet-A's.
    plain = build_model(bnext_spec("bnext_tiny", 10, True, act_binarizer="ste", weight_binarizer="sign")).eval()
    x = torch.randn(2, 3, 32, 32)
    assert plain(x).shape == (2, 10)
    with pytest.raises(RegistryError, match="--act_binarizer bnext_sign reads a temperature"):
        build_model(RunSpec("reactnet_a", "bnext_sign", num_classes=10))


# --- The binarizers, element by element ---

def activation_reference(values, temperature, upstream):
    """Forward sign(clamp(x / max(T, 1e-8), -1, 1)), sign(0) = 0; backward the upstream gradient
    where |x| < 1.5 (PyTorch's gradient of clamp(x, -1.5, 1.5), which passes none at the bounds)."""
    divisor = max(temperature, 1e-8)
    out = [float((v / divisor > 0) - (v / divisor < 0)) for v in values]
    grad = [g if abs(v) < 1.5 else 0.0 for v, g in zip(values, upstream)]
    return out, grad


def weight_reference(values, temperature, upstream, training):
    """Forward sign(W) when T < 1e-7, else clamp(W / max(T, 1e-8), -1, 1); backward the identity in
    training, else the derivative of the forward: 0 for the sign, 1/T where |W/T| < 1."""
    if temperature < 1e-7:
        out = [float((v > 0) - (v < 0)) for v in values]
        derivative = [0.0] * len(values)
    else:
        out = [min(1.0, max(-1.0, v / temperature)) for v in values]
        derivative = [1 / temperature if abs(v / temperature) < 1 else 0.0 for v in values]
    grad = list(upstream) if training else [g * d for g, d in zip(upstream, derivative)]
    return out, grad


POINTS = [-3.0, -1.5, -1.4999, -1.0, -0.3, -1e-9, 0.0, 1e-9, 2e-8, 0.3, 0.9999, 1.0, 1.5, 1.5001, 4.0]


def through(function, values, temperature, upstream, dtype=torch.float64):
    x = torch.tensor(values, dtype=dtype, requires_grad=True)
    out = function(x, torch.tensor([temperature], dtype=dtype))
    out.backward(torch.tensor(upstream, dtype=dtype))
    return out.detach(), x.grad


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("training", [True, False])
def test_activation_binarizer_matches_its_formula(temperature, training):
    upstream = [0.5 + k for k in range(len(POINTS))]
    out, grad = through(lambda x, t: bnext_sign(x, t, training), POINTS, temperature, upstream)
    want_out, want_grad = activation_reference(POINTS, temperature, upstream)
    assert torch.equal(out, torch.tensor(want_out, dtype=torch.float64))
    assert torch.equal(grad, torch.tensor(want_grad, dtype=torch.float64))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("training", [True, False])
def test_weight_binarizer_matches_its_formula(temperature, training):
    upstream = [0.5 + k for k in range(len(POINTS))]
    out, grad = through(lambda w, t: bnext_weight(w, t, training), POINTS, temperature, upstream)
    want_out, want_grad = weight_reference(POINTS, temperature, upstream, training)
    torch.testing.assert_close(out, torch.tensor(want_out, dtype=torch.float64), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), rtol=1e-15, atol=0)


def test_weights_are_progressive_while_the_temperature_is_large():
    # At 0.9 ** 152 (about 1.1e-7) the weights are still clamp(W / T); at 0.9 ** 153 they are signs.
    w = torch.tensor([[[[-3e-8, 5e-8, 2e-7]]]])
    for epoch, binary in ((152, False), (153, True)):
        t = torch.ones(1)
        for _ in range(epoch):
            t.mul_(0.9)
        out = bnext_weight(w, t, False)
        assert torch.equal(out.abs() == 1, torch.full_like(w, True, dtype=torch.bool)) is binary


@pytest.mark.parametrize("temperature", [1.0, 0.3, 1e-8])
def test_training_values_are_the_published_straight_through_ones_bit_for_bit(temperature):
    # The published code writes the straight-through estimators as d.detach() - c.detach() + c, which
    # rounds: the float32 values, and all that follows them, equal the published ones only if
    # computed the same way.
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 2
    t = torch.tensor([temperature])
    clipped = x.clamp(-1.5, 1.5)
    assert torch.equal(bnext_sign(x, t, True),
                       torch.sign(torch.clamp(x / t.clamp(min=1e-8), -1, 1)) - clipped + clipped)
    exact = torch.sign(x) if temperature < 1e-7 else torch.clamp(x / t, -1, 1)
    assert torch.equal(bnext_weight(x, t, True), exact - x + x)


def test_the_published_straight_through_weights_miss_the_formula():
    # What the test above tells apart: (b - W) + W is not b everywhere while the weights are not signs.
    w = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 0.3
    t = torch.tensor([0.3])
    assert not torch.equal(bnext_weight(w, t, True), torch.clamp(w / t, -1, 1))
    assert torch.equal(bnext_weight(w, t, False), torch.clamp(w / t, -1, 1))


def test_activation_binarizer_keeps_one_tensor_for_backward():
    x = torch.randn(5, requires_grad=True)
    out = bnext_sign(x, torch.ones(1), True)
    assert len(out.grad_fn.saved_tensors) == 1


# --- The network written as functions of a flat dict of tensors ---

def ref_sign(x, temperature):
    clipped = x.clamp(-1.5, 1.5)
    return clipped + (torch.sign(torch.clamp(x / temperature.clamp(min=1e-8), -1, 1)) - clipped).detach()


def ref_weight(w, temperature, training):
    if temperature.item() < 1e-7:
        value = torch.sign(w)
    else:
        value = torch.clamp(w / temperature.clamp(min=1e-8), -1, 1)
    return w + (value - w).detach() if training else value


def ref_bn(x, p, name, training):
    return F.batch_norm(x, p[f"{name}.running_mean"], p[f"{name}.running_var"], p[f"{name}.weight"],
                        p[f"{name}.bias"], training, BN_MOMENTUM, BN_EPS)


def ref_unit(x, p, q, kernel, stride, elm, training, binary_weights):
    """One unit: shift, sign, binary conv, BN1, PReLU2; recoupling with the clamped scale and SE;
    ELM: times PReLU1(input); BN2; plus the shortcut (inputs pooled 2x2 at stride 2)."""
    w = p[f"{q}.binary_conv.weight"]
    if binary_weights:
        if training:
            with torch.no_grad():
                w.clamp_(-1.5, 1.5)
        w = ref_weight(w, p[f"{q}.binary_conv.temperature"], training)
    a = ref_sign(x + p[f"{q}.move.bias"], p[f"{q}.binary_activation.temperature"])
    y = F.conv2d(a, w, stride=stride, padding=kernel // 2)
    y = F.prelu(ref_bn(y, p, f"{q}.norm1", training), p[f"{q}.activation2.weight"])
    shortcut = F.prelu(x, p[f"{q}.activation1.weight"]) if elm else x
    if stride == 2:
        x, shortcut = F.avg_pool2d(x, 2), F.avg_pool2d(shortcut, 2)
    scale = p[f"{q}.scale"]
    if training or kernel == 1:
        with torch.no_grad():
            scale.clamp_(0, 1)
    mix = scale * x + (1 - scale) * y
    squeezed = F.relu(F.conv2d(mix.mean(dim=(2, 3), keepdim=True), p[f"{q}.se.se.1.weight"], p[f"{q}.se.se.1.bias"]))
    y = torch.sigmoid(F.conv2d(squeezed, p[f"{q}.se.se.3.weight"], p[f"{q}.se.se.3.bias"])) * y
    if elm:
        y = y * shortcut
    return ref_bn(y, p, f"{q}.norm2", training) + shortcut


def ref_block(x, p, q, inplanes, planes, stride, elm, training, binary_weights):
    x = ref_unit(x, p, f"{q}.Attention", 3, stride, elm, training, binary_weights)
    if planes == inplanes:
        return ref_unit(x, p, f"{q}.FFN", 1, 1, False, training, binary_weights)
    return torch.cat([ref_unit(x, p, f"{q}.FFN_{k}", 1, 1, False, training, binary_weights) for k in (1, 2)], 1)


def ref_network(x, p, widths, training, binary_weights):
    """Stem (conv, BN; its PReLU unused), blocks, PReLU, mean pool, fc."""
    stride = 2 if p["fc.weight"].shape[0] == 1000 else 1
    x = ref_bn(F.conv2d(x, p["feature.0.conv1.weight"], stride=stride, padding=1), p, "feature.0.bn1", training)
    for i in range(1, len(widths)):
        stride = 2 if widths[i - 1] != widths[i] and widths[i] != widths[1] else 1
        x = ref_block(x, p, f"feature.{i}", widths[i - 1], widths[i], stride, i % 2 == 0, training, binary_weights)
    x = F.prelu(x, p["prelu.weight"]).mean(dim=(2, 3))
    return F.linear(x, p["fc.weight"], p["fc.bias"])


def randomise(model, temperature, seed=0):
    """Values away from the initial ones everywhere: latent weights and scales beyond their clamps,
    slopes, shifts and statistics drawn, every temperature set to ``temperature``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            draw = torch.rand(t.shape, generator=g, dtype=t.dtype)
            if name.endswith("temperature"):
                t.fill_(temperature)
            elif name.endswith("running_var"):
                t.copy_(draw * 0.5 + 0.5)
            elif name.endswith(".scale"):
                t.copy_(draw * 2 - 0.5)
            elif "binary_conv" in name:
                t.copy_((draw * 2 - 1) * 2)
            elif name.endswith(("norm1.weight", "norm2.weight", "bn1.weight")):
                t.copy_(draw + 0.5)
            else:
                t.copy_((draw * 2 - 1) * 0.4)
    return model


def compare(model, reference, x, seed=1):
    """Logits, gradients of every parameter and of the input, and the state after the forward
    (in-place clamps, running statistics) of ``model`` against ``reference(x, params)``."""
    params = {k: v.detach().clone().requires_grad_(k in dict(model.named_parameters()))
              for k, v in model.state_dict().items()}
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits, expected = model(x1), reference(x2, params)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    (logits * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-9)
    for name, p in model.named_parameters():
        want = params[name].grad
        if want is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, want, rtol=1e-9, atol=1e-9 * want.abs().max().item(), msg=name)
    for name, value in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):  # which F.batch_norm does not count
            torch.testing.assert_close(value, params[name].detach(), rtol=1e-12, atol=0, msg=name)


# Every kind of block: stage 1 widening at stride 1, ELM attention with and without stride 2 and
# widening, plain 3x3 units at stride 1 and 2 (the published sizes have no plain stride-2 block).
SMALL_WIDTHS = [8, 16, 16, 32, 32, 32, 64]


@pytest.mark.parametrize("temperature", [1.0, 0.3, 1e-8])
@pytest.mark.parametrize("training", [True, False])
def test_blocks_match_the_reference(temperature, training):
    torch.manual_seed(0)
    model = randomise(BNext(SMALL_WIDTHS, num_classes=5, binary_weights=True).double(), temperature)
    model.train(training)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    compare(model, lambda x, p: ref_network(x, p, SMALL_WIDTHS, training, True), x)


@pytest.mark.parametrize("training", [True, False])
def test_real_weights_match_the_reference(training):
    torch.manual_seed(0)
    model = randomise(BNext(SMALL_WIDTHS, num_classes=5, binary_weights=False).double(), 0.5)
    model.train(training)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    compare(model, lambda x, p: ref_network(x, p, SMALL_WIDTHS, training, False), x)


@pytest.mark.slow
def test_tiny_at_1000_classes_matches_the_reference_in_training():
    torch.manual_seed(0)
    model = randomise(build_model(bnext_spec("bnext_tiny", 1000, True)).double(), 0.9 ** 5).train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    compare(model, lambda x, p: ref_network(x, p, WIDTHS["tiny"], True, True), x)


def test_reference_sees_a_swapped_mixer():
    # The reference is not blind to the unit kinds: the ELM attention in odd blocks gives other logits.
    torch.manual_seed(0)
    model = randomise(BNext(SMALL_WIDTHS, num_classes=5, binary_weights=True).double(), 1.0).eval()
    params = dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    swapped = model.feature[3].Attention
    swapped.elm_attention = not swapped.elm_attention
    assert not torch.allclose(model(x), ref_network(x, params, SMALL_WIDTHS, False, True))


# --- In-place clamps, the unused stem PReLU, the temperature schedule ---

def unit(kernel, stride=1, binary_weights=True):
    torch.manual_seed(0)
    return BinaryUnit(8, kernel, stride, kernel == 3, binary_weights)


@pytest.mark.parametrize("kernel, training, clamped", [(3, True, True), (3, False, False),
                                                       (1, True, True), (1, False, True)])
def test_scale_is_clamped_in_place_where_published(kernel, training, clamped):
    u = unit(kernel).train(training)
    with torch.no_grad():
        u.scale.copy_(torch.linspace(-1, 2, 8).view(1, 8, 1, 1))
    u(torch.randn(2, 8, 6, 6))
    expected = torch.linspace(-1, 2, 8).view(1, 8, 1, 1)
    assert torch.equal(u.scale.detach(), expected.clamp(0, 1) if clamped else expected)


@pytest.mark.parametrize("binary_weights, training, clamped", [(True, True, True), (True, False, False),
                                                               (False, True, False)])
def test_latent_weights_are_clamped_in_place_in_training(binary_weights, training, clamped):
    u = unit(3, binary_weights=binary_weights).train(training)
    with torch.no_grad():
        u.binary_conv.weight[0, 0, 0] = torch.tensor([-4.0, 0.2, 3.0])
    u(torch.randn(2, 8, 6, 6))
    row = u.binary_conv.weight[0, 0, 0].detach()
    assert torch.equal(row, torch.tensor([-1.5, 0.2, 1.5]) if clamped else torch.tensor([-4.0, 0.2, 3.0]))


def test_unused_stem_prelu_is_kept_and_changes_nothing():
    model = build_model(bnext_spec("bnext_tiny", 10, True)).eval()
    # The published initial slope is the channel count (PReLU(oup, oup)).
    assert torch.equal(model.feature[0].prelu.weight.detach(), torch.full((32,), 32.0))
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    with torch.no_grad():
        model.feature[0].prelu.weight.fill_(-7.0)
    assert torch.equal(model(x), before)


def test_temperature_schedule_and_record():
    model = build_model(bnext_spec("bnext_tiny", 10, True))
    temperatures = model.temperatures()
    assert len(temperatures) == 2 * sum(1 for m in model.modules() if isinstance(m, BinaryUnit))
    expected = torch.ones(1)
    for epoch in range(4):
        model.start_epoch(epoch)
        if epoch > 0:
            expected = expected * 0.9
        assert all(torch.equal(t, expected) for t in temperatures)
        assert model.epoch_record() == {"temperature": expected.item()}
    assert math.isclose(expected.item(), 0.9 ** 3, rel_tol=1e-6)


def test_seeded_construction_draws_normal_latent_weights_with_std_0_001():
    torch.manual_seed(0)
    a = build_model(bnext_spec("bnext_tiny", 10, True))
    torch.manual_seed(0)
    b = build_model(bnext_spec("bnext_tiny", 10, False))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    weights = torch.cat([m.weight.flatten() for m in a.modules() if isinstance(m, HardBinaryConv)])
    assert abs(weights.std().item() - 0.001) < 1e-5 and abs(weights.mean().item()) < 1e-5
    assert all(isinstance(m, Block) for m in a.feature[1:])
