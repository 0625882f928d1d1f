"""ReActNet-A of models/reactnet.py against the architecture written out
independently below and the published state_dict."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from models import reactnet
from models.reactnet import BasicBlock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATE_DICT_TSV = os.path.join(REPO, "tests", "reactnet_a_state_dict.tsv")
PARAMETERS_AT_1000_CLASSES = 29_343_592

# Entries 1..13 of `feature`: (inplanes, planes, stride). Stride 2 wherever the
# width changes, except 32 -> 64.
BLOCKS = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
          (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
          (512, 1024, 2), (1024, 1024, 1)]
BN_EPS, BN_MOMENTUM = 1e-5, 0.1
NUM_CLASSES = 7


def read_tsv():
    rows = []
    with open(STATE_DICT_TSV) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, shape, dtype = line.rstrip("\n").split("\t")
            dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
            rows.append((name, dims, getattr(torch, dtype)))
    return rows


def described(model):
    return [(name, tuple(t.shape), t.dtype) for name, t in model.state_dict().items()]


# --- The reference: the architecture and binarizers written as functions of a flat dict of tensors. ---

def sign_published_style(x):
    """sign(x) forward; the gradient of F = -1 | x^2+2x | -x^2+2x | 1 via float masks."""
    lt_m1, lt_0, lt_1 = (x < -1).to(x.dtype), (x < 0).to(x.dtype), (x < 1).to(x.dtype)
    f = (-1) * lt_m1 + (x * x + 2 * x) * (lt_0 - lt_m1) + (2 * x - x * x) * (lt_1 - lt_0) + (1 - lt_1)
    return f + (torch.sign(x) - f).detach()


def binary_weight_published_style(w):
    """alpha * sign(w) forward with alpha = mean |w| per output channel, clamp(w, -1, 1) backward."""
    alpha = w.detach().abs().mean(dim=(1, 2, 3), keepdim=True)
    clipped = w.clamp(-1, 1)
    return clipped + (alpha * torch.sign(w) - clipped).detach()


def ref_batch_norm(x, p, name, training):
    # The module updates its buffers in place; the reference updates its own copies.
    return F.batch_norm(x, p[name + ".running_mean"], p[name + ".running_var"], p[name + ".weight"],
                        p[name + ".bias"], training, BN_MOMENTUM, BN_EPS)


def ref_rprelu(x, p, prefix, shift_in, slope, shift_out):
    x = x + p[f"{prefix}.{shift_in}.bias"]
    x = torch.where(x >= 0, x, x * p[f"{prefix}.{slope}.weight"].view(1, -1, 1, 1))
    return x + p[f"{prefix}.{shift_out}.bias"]


def average_2x2(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def ref_block(x, p, index, inplanes, planes, stride, training, binary_weights):
    prefix = f"feature.{index}"

    def conv(a, name, stride=1):
        w = p[f"{prefix}.{name}.weight"]
        w = binary_weight_published_style(w) if binary_weights else w
        return F.conv2d(a, w, stride=stride, padding=w.shape[-1] // 2)

    a = sign_published_style(x + p[f"{prefix}.move11.bias"])
    out = ref_batch_norm(conv(a, "binary_3x3", stride), p, f"{prefix}.bn1", training)
    shortcut = average_2x2(x) if stride == 2 else x
    out1 = ref_rprelu(out + shortcut, p, prefix, "move12", "prelu1", "move13")

    a = sign_published_style(out1 + p[f"{prefix}.move21.bias"])
    if planes == inplanes:
        out2 = ref_batch_norm(conv(a, "binary_pw"), p, f"{prefix}.bn2", training) + out1
    else:
        down1 = ref_batch_norm(conv(a, "binary_pw_down1"), p, f"{prefix}.bn2_1", training) + out1
        down2 = ref_batch_norm(conv(a, "binary_pw_down2"), p, f"{prefix}.bn2_2", training) + out1
        out2 = torch.cat([down1, down2], dim=1)
    return ref_rprelu(out2, p, prefix, "move22", "prelu2", "move23")


def ref_forward(x, p, training, binary_weights):
    x = F.conv2d(x, p["feature.0.conv1.weight"], stride=2, padding=1)
    x = ref_batch_norm(x, p, "feature.0.bn1", training)
    for index, (inplanes, planes, stride) in enumerate(BLOCKS, start=1):
        x = ref_block(x, p, index, inplanes, planes, stride, training, binary_weights)
    return x.mean(dim=(2, 3)) @ p["fc.weight"].t() + p["fc.bias"]


# --- Helpers ---

def randomise(model, seed):
    """Non-default values everywhere, so that a misplaced bias, slope or statistic shows."""
    g = torch.Generator().manual_seed(seed)

    def draw(t, low, high):
        return torch.rand(t.shape, generator=g, dtype=t.dtype) * (high - low) + low

    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if ".move" in name:
                t.copy_(draw(t, -0.3, 0.3))
            elif ".prelu" in name:
                t.copy_(draw(t, -0.2, 0.6))
            elif name.endswith("running_var"):
                t.copy_(draw(t, 0.3, 0.8))
            elif name.endswith("running_mean") or (".bn" in name and name.endswith(".bias")):
                t.copy_(draw(t, -0.2, 0.2))
            elif ".bn" in name and name.endswith(".weight"):
                t.copy_(draw(t, 0.5, 1.5))
            elif t.dim() == 4:
                bound = 1 / math.sqrt(t[0].numel())
                t.copy_(draw(t, -bound, bound))
                # Entries beyond the clip, which must get no gradient under binary weights.
                t.view(t.shape[0], -1)[0, :2] = torch.tensor([1.5, -2.0], dtype=t.dtype)
    return model


def model_and_reference(state, binary_weights, training):
    model = reactnet(num_classes=NUM_CLASSES, binary_weights=binary_weights).double()
    model.load_state_dict(state)
    model.train(training)
    params = {name: t.clone().requires_grad_(t.is_floating_point() and "running" not in name)
              for name, t in state.items()}
    return model, params


def relative_tolerance(binary_weights):
    # The model computes alpha in float32 even for float64 weights; the reference does not.
    return 1e-5 if binary_weights else 1e-7


def assert_matches(actual, expected, rtol, name=""):
    """Close up to ``rtol`` of the largest expected magnitude, so tiny entries are not held to
    a relative bound that rounding in their larger neighbours already exceeds."""
    atol = rtol * expected.detach().abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def backward_from(logits, seed):
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(seed), dtype=logits.dtype)
    (logits * upstream).sum().backward()


def input_batch(size=32, batch=2, seed=11):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


@pytest.fixture(scope="module")
def random_state():
    """Drawn by a step-1 model: the step-2 comparisons then also run on handed-off weights."""
    torch.manual_seed(0)
    model = randomise(reactnet(num_classes=NUM_CLASSES), seed=1).double()
    return {k: t.detach().clone() for k, t in model.state_dict().items()}


# --- Tests ---

@pytest.mark.parametrize("binary_weights", [False, True])
def test_state_dict_matches_published_names_shapes_dtypes_and_order(binary_weights):
    assert described(reactnet(1000, binary_weights)) == read_tsv()


def test_state_dict_has_298_entries():
    assert len(read_tsv()) == 298


@pytest.mark.parametrize("binary_weights", [False, True])
def test_parameter_count(binary_weights):
    model = reactnet(1000, binary_weights)
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS_AT_1000_CLASSES


def test_classifier_width_follows_num_classes():
    model = reactnet(num_classes=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert tuple(model.fc.weight.shape) == (5, 1024)


@pytest.mark.parametrize("size, side", [(64, 2), (96, 3)])
def test_feature_map_is_downsampled_by_32(size, side):
    model = reactnet(num_classes=4).eval()
    seen = []
    model.pool1.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert seen == [(1, 1024, side, side)]


def test_strides_and_pooling_shortcuts():
    model = reactnet(num_classes=4)
    blocks = list(model.feature)[1:]
    assert [block.binary_3x3.stride for block in blocks] == [(s, s) for _, _, s in BLOCKS]
    assert [hasattr(block, "pooling") for block in blocks] == [s == 2 for _, _, s in BLOCKS]
    assert model.feature[0].conv1.stride == (2, 2)


def test_binary_3x3_is_a_full_convolution():
    block = reactnet(num_classes=4).feature[3]
    assert block.binary_3x3.groups == 1
    assert tuple(block.binary_3x3.weight.shape) == (128, 128, 3, 3)


def test_step2_binary_latent_weights_start_in_small_positive_range():
    torch.manual_seed(0)
    model = reactnet(num_classes=4, binary_weights=True)
    for name, w in model.state_dict().items():
        if ".binary_" in name:
            assert w.min() >= 0 and w.max() < 0.001, name
            assert w.std().item() == pytest.approx(0.001 / math.sqrt(12), rel=0.1), name
    assert model.feature[0].conv1.weight.min() < 0


def test_step1_binary_convs_use_default_initialisation():
    # nn.Conv2d's default, kaiming_uniform(a=sqrt(5)), is uniform in +-1/sqrt(fan_in).
    torch.manual_seed(0)
    model = reactnet(num_classes=4, binary_weights=False)
    for name, w in model.state_dict().items():
        if ".binary_" in name:
            bound = 1 / math.sqrt(w[0].numel())
            assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound, name
            assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15), name


@pytest.mark.parametrize("binary_weights", [False, True])
def test_seeded_construction_is_deterministic(binary_weights):
    def build(seed):
        torch.manual_seed(seed)
        return reactnet(num_classes=4, binary_weights=binary_weights).state_dict()

    first, again, other = build(3), build(3), build(4)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["feature.5.binary_pw.weight"], other["feature.5.binary_pw.weight"])


@pytest.mark.parametrize("binary_weights", [False, True], ids=["step1", "step2"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_and_gradients_match_functional_reference(random_state, binary_weights, training):
    model, params = model_and_reference(random_state, binary_weights, training)
    x = input_batch()
    rtol = relative_tolerance(binary_weights)

    logits = model(x)
    backward_from(logits, seed=5)
    expected = ref_forward(x, params, training, binary_weights)
    backward_from(expected, seed=5)

    assert_matches(logits, expected, rtol, "logits")
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_matches(p.grad, params[name].grad, rtol, name)
    for name, buffer in model.named_buffers():
        if "running" in name:
            assert_matches(buffer, params[name], rtol, name)


def test_reference_sees_a_misplaced_concatenation(random_state):
    # Guards the guard: swapping down1 and down2 of one block in the reference changes the logits.
    model, params = model_and_reference(random_state, binary_weights=False, training=False)
    for suffix in ("binary_pw_down{}.weight", "bn2_{}.weight", "bn2_{}.bias", "bn2_{}.running_mean",
                   "bn2_{}.running_var"):
        a, b = (f"feature.2.{suffix.format(k)}" for k in (1, 2))
        params[a], params[b] = params[b], params[a]
    x = input_batch()
    with torch.no_grad():
        assert not torch.allclose(model(x), ref_forward(x, params, False, False), rtol=1e-3, atol=1e-3)


def test_step2_binary_weights_get_no_gradient_beyond_the_clip():
    torch.manual_seed(0)
    block = randomise(BasicBlock(32, 64, stride=1, binary_weights=True), seed=3)
    block(torch.randn(2, 32, 8, 8)).sum().backward()
    for name, p in block.named_parameters():
        if name.startswith("binary_"):
            rows = p.grad.view(p.shape[0], -1)
            assert torch.equal(rows[0, :2], torch.zeros(2)), name
            assert rows[0, 2:].abs().sum() > 0 and rows[1:].abs().sum() > 0, name


@pytest.mark.parametrize("source, target", [(False, True), (True, False)], ids=["1to2", "2to1"])
def test_step_handoff_loads_strictly(source, target):
    torch.manual_seed(0)
    trained = randomise(reactnet(num_classes=6, binary_weights=source), seed=2)
    receiver = reactnet(num_classes=6, binary_weights=target)
    result = receiver.load_state_dict(trained.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    received = receiver.state_dict()
    assert all(torch.equal(t, received[k]) for k, t in trained.state_dict().items())
