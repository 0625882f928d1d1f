"""Architectures and binarizers by name: the new binarizers against references written here, the
defaults unchanged, the names saved in checkpoints and read back, and ReActNet-18."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, evaluate_args, last_val_line, main_error_line, run_script, run_sh, succeeded

from models import RunSpec, build_model, reactnet
from models.binarize import binarize_activation, binarize_weight
from models.checkpoint import CheckpointError, model_from_checkpoint
from models.layers import BinaryActivation, binary_convs
from models.ops import count_ops
from models.published import masked_polynomial_sign, nested_mean_clamped_sign
from models.registry import (ACT_BINARIZERS, ARCHITECTURES, WEIGHT_BINARIZERS, RegistryError,
                             get_act_binarizer, get_architecture, register_architecture)
from tools import export_lce


def forward_and_grad(function, x, upstream):
    x = x.detach().clone().requires_grad_(True)
    out = function(x)
    out.backward(upstream)
    return out.detach(), x.grad


POINTS = torch.tensor([-3.0, -1.001, -1.0, -0.999, -0.3, -1e-6, 0.0, 1e-6, 0.3, 0.999, 1.0, 1.001, 3.0])


# --- Binarizers: the new ones against their papers' formulas, element by element ---

def clipped_ste_reference(x, upstream):
    """BinaryNet (Hubara et al. 2016): forward sign(x) with sign(0) = 0; backward passes the
    gradient where |x| <= 1 and nothing elsewhere."""
    out = [(v > 0) - (v < 0) for v in x.tolist()]
    grad = [g if abs(v) <= 1 else 0.0 for v, g in zip(x.tolist(), upstream.tolist())]
    return torch.tensor(out, dtype=x.dtype), torch.tensor(grad, dtype=x.dtype)


@pytest.mark.parametrize("table,name", [(ACT_BINARIZERS, "ste"), (WEIGHT_BINARIZERS, "sign")])
def test_clipped_straight_through_sign_matches_its_formula(table, name):
    upstream = torch.linspace(-2, 2, len(POINTS))
    out, grad = forward_and_grad(table[name], POINTS, upstream)
    expected_out, expected_grad = clipped_ste_reference(POINTS, upstream)
    assert torch.equal(out, expected_out)
    assert torch.equal(grad, expected_grad)


def test_unscaled_sign_weights_differ_from_the_scaled_default():
    weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 0.01
    assert torch.equal(WEIGHT_BINARIZERS["sign"](weight), torch.sign(weight))
    assert not torch.allclose(WEIGHT_BINARIZERS["scaled_sign"](weight), torch.sign(weight))


def test_defaults_and_published_entries_are_the_existing_functions():
    assert ACT_BINARIZERS["polynomial"] is binarize_activation
    assert WEIGHT_BINARIZERS["scaled_sign"] is binarize_weight
    assert ACT_BINARIZERS["published"] is masked_polynomial_sign
    assert WEIGHT_BINARIZERS["published"] is nested_mean_clamped_sign
    spec = RunSpec()
    assert (spec.arch, spec.act_binarizer, spec.weight_binarizer) == ("reactnet_a", "polynomial", "scaled_sign")


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(RegistryError, match="unknown activation binarizer 'nope' .*BNN_PLUGINS"):
        get_act_binarizer("nope")
    with pytest.raises(RegistryError, match="registered twice"):
        register_architecture("reactnet_a", "again")(reactnet)


# --- The default model is the one built before the registry, bit for bit ---

@pytest.mark.parametrize("binary_weights", [False, True])
def test_default_spec_builds_reactnet_a_bit_for_bit(binary_weights):
    torch.manual_seed(3)
    direct = reactnet(5, binary_weights)
    torch.manual_seed(3)
    named = build_model(RunSpec(num_classes=5, step=2 if binary_weights else 1))
    assert list(direct.state_dict()) == list(named.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), named.state_dict().values()))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(direct(x), named(x))


def test_chosen_binarizers_reach_every_binary_module():
    model = build_model(RunSpec("reactnet_18", "ste", "sign", num_classes=3))
    activations = [m for m in model.modules() if isinstance(m, BinaryActivation)]
    convs = [m for _, m in binary_convs(model)]
    assert len(activations) == len(convs) == 16
    assert all(m.binarizer is ACT_BINARIZERS["ste"] for m in activations)
    assert all(m.weight_binarizer is WEIGHT_BINARIZERS["sign"] for m in convs)


# --- Names in checkpoints ---

def test_checkpoint_names_are_read_back_and_files_without_them_are_reactnet_a(tmp_path):
    model = build_model(RunSpec("reactnet_18", "ste", "sign", image_size=64, num_classes=3))
    named = tmp_path / "named.pth"
    torch.save({"state_dict": model.state_dict(), **model.spec.as_dict()}, named)
    loaded, overrides = model_from_checkpoint(str(named))
    assert (loaded.spec, overrides) == (model.spec, {})
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    released = tmp_path / "released.pth"  # a bare state_dict, as the authors' files hold
    torch.save({f"module.{k}": v for k, v in reactnet(3, True).state_dict().items()}, released)
    assert model_from_checkpoint(str(released))[0].spec == RunSpec(num_classes=3)


def test_a_checkpoint_of_an_unregistered_architecture_says_what_to_do(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"state_dict": reactnet(3).state_dict(), "arch": "someone_elses"}, path)
    with pytest.raises(CheckpointError, match="unknown architecture 'someone_elses'.*BNN_PLUGINS"):
        model_from_checkpoint(str(path))


def test_lce_export_refuses_other_architectures_in_one_line(tmp_path, capsys):
    path = tmp_path / "r18.pth"
    model = build_model(RunSpec("reactnet_18", num_classes=3))
    torch.save({"state_dict": model.state_dict(), "step": 2, **model.spec.as_dict()}, path)
    line = main_error_line(export_lce.main, ["--checkpoint", path, "--data", tmp_path], capsys)
    assert line == (f"error: {path} holds a ReActNet-18 (--arch reactnet_18): the LCE export maps "
                    f"only ReActNet-A's topology (reactnet_a)")


# --- ReActNet-18 ---

def shift(x, bias):
    return x + bias.reshape(1, -1, 1, 1)


def batch_norm(x, p, prefix):
    return F.batch_norm(x, p[f"{prefix}.running_mean"], p[f"{prefix}.running_var"], p[f"{prefix}.weight"],
                        p[f"{prefix}.bias"], training=False, eps=1e-5)


def reactnet18_reference(p, x, binary_weights):
    """ReActNet-18 written out from the papers, on a state_dict, in eval mode: 7x7 stem + BN + max
    pool; 4 stages x 4 blocks of [shift, sign, 3x3 conv, BN, + shortcut, shift, PReLU, shift]; the
    first block of stages 2-4 has stride 2 and a 2x2 avg pool + 1x1 conv + BN shortcut."""
    x = F.max_pool2d(batch_norm(F.conv2d(x, p["conv1.weight"], stride=2, padding=3), p, "bn1"), 3, 2, 1)
    for stage in range(1, 5):
        for block in range(4):
            q = f"layer{stage}.{block}"
            stride = 2 if block == 0 and stage > 1 else 1
            w = p[f"{q}.binary_conv.weight"]
            if binary_weights:
                w = w.abs().mean(dim=(1, 2, 3), keepdim=True) * torch.sign(w)
            out = F.conv2d(torch.sign(shift(x, p[f"{q}.move0.bias"])), w, stride=stride, padding=1)
            out = batch_norm(out, p, f"{q}.bn1")
            if f"{q}.downsample.1.weight" in p:
                x = batch_norm(F.conv2d(F.avg_pool2d(x, 2, stride), p[f"{q}.downsample.1.weight"]),
                               p, f"{q}.downsample.2")
            out = shift(out + x, p[f"{q}.move1.bias"])
            out = F.prelu(out, p[f"{q}.prelu.weight"])
            x = shift(out, p[f"{q}.move2.bias"])
    return F.linear(x.mean(dim=(2, 3)), p["fc.weight"], p["fc.bias"])


@pytest.mark.parametrize("binary_weights", [False, True])
def test_reactnet18_forward_matches_the_reference(binary_weights):
    torch.manual_seed(0)
    model = build_model(RunSpec("reactnet_18", num_classes=7, step=2 if binary_weights else 1)).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every parameter and statistic away from its initial value
        for value in model.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=g, dtype=value.dtype) * 0.1)
        for name, value in model.state_dict().items():
            if name.endswith("running_var"):
                value.abs_().add_(0.5)
    x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64)
    expected = reactnet18_reference(dict(model.state_dict()), x, binary_weights)
    torch.testing.assert_close(model(x), expected, rtol=1e-9, atol=1e-9)


def test_reactnet18_layout():
    model = build_model(RunSpec("reactnet_18"))
    convs = binary_convs(model)
    assert [name for name, _ in convs] == [f"layer{s}.{b}.binary_conv" for s in range(1, 5) for b in range(4)]
    assert all(conv.kernel_size == (3, 3) and conv.binary_weights for _, conv in convs)
    real = [n for n, m in model.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert real == ["conv1", "layer2.0.downsample.1", "layer3.0.downsample.1", "layer4.0.downsample.1", "fc"]
    assert model.state_dict()["layer1.0.binary_conv.weight"].shape == (64, 64, 3, 3)
    assert get_architecture("reactnet_18").downsampling == 32
    assert {"reactnet_a", "reactnet_18"} <= set(ARCHITECTURES)  # plus any test-registered toy


def test_reactnet18_cost_at_224_by_hand():
    # Binary 3x3 MACs: stage 1 at 56x56, 64 -> 64, four convs; stages 2-4 halve the side and double
    # the width, their first conv reading half the channels. Real: 7x7 stem at 112x112, three 1x1
    # downsampling convs (C -> 2C at the stage's output side), fc.
    def conv(side, cin, cout, k):
        return side * side * cin * cout * k * k
    bops = 4 * conv(56, 64, 64, 3) + sum(conv(s, c // 2, c, 3) + 3 * conv(s, c, c, 3)
                                         for s, c in ((28, 128), (14, 256), (7, 512)))
    flops = conv(112, 3, 64, 7) + sum(conv(s, c // 2, c, 1) for s, c in ((28, 128), (14, 256), (7, 512))) \
        + 512 * 1000
    counts = count_ops(build_model(RunSpec("reactnet_18")), 224)
    assert (counts["bops"], counts["flops"]) == (bops, flops)
    assert counts["ops"] == bops / 64 + flops
    # The papers' rounded figures: 1.68e9 BOPs, 1.39e8 FLOPs, 1.63e8 OPs.
    assert round(bops / 1e9, 2) == 1.68 and abs(flops / 1e8 - 1.39) < 0.02 and abs(counts["ops"] / 1e8 - 1.63) < 0.02



@pytest.mark.slow
def test_reactnet18_through_both_run_sh_resume_and_evaluate(tiny_data, teacher_weights, tmp_path):
    step1_dir, step2_dir = str(tmp_path / "step1"), str(tmp_path / "step2")
    env = {"DATA": tiny_data, "BATCH_SIZE": "8", "IMAGE_SIZE": "32", "TEACHER": "resnet18",
           "TEACHER_WEIGHTS": teacher_weights, "WORKERS": "0", "NGPUS": "1"}
    succeeded(run_sh(1, dict(env, ARCH="reactnet_18", EPOCHS="2", SAVE=step1_dir), "--device", "cpu", cwd=REPO))
    # One more epoch on the same folder: the run resumes ReActNet-18 where it stopped.
    resumed = succeeded(run_sh(1, dict(env, ARCH="reactnet_18", EPOCHS="3", SAVE=step1_dir), "--device", "cpu",
                               "--resume_with_changes", cwd=REPO))
    assert "=> resuming" in resumed.stdout and "=> step 1: ReActNet-18" in resumed.stdout
    # Without ARCH, step 2 builds the architecture of the step-1 checkpoint it starts from.
    best1 = os.path.join(step1_dir, "model_best.pth.tar")
    step2 = succeeded(run_sh(2, dict(env, EPOCHS="2", SAVE=step2_dir, STEP1_CHECKPOINT=best1), "--device", "cpu",
                             cwd=REPO))
    assert "=> step 2: ReActNet-18" in step2.stdout and f"initialised from step-1 weights {best1}" in step2.stdout
    best2 = os.path.join(step2_dir, "model_best.pth.tar")
    saved = torch.load(best2, weights_only=True)
    assert (saved["arch"], saved["step"], saved["args"]["arch"]) == ("reactnet_18", 2, "reactnet_18")
    evaluated = succeeded(run_script("evaluate.py", *evaluate_args(tiny_data, best2)))
    assert f"=> evaluating {best2} (ReActNet-18) as step 2" in evaluated.stdout
    assert last_val_line(evaluated.stdout) == last_val_line(open(os.path.join(step2_dir, "log.txt")).read())
    # A ReActNet-A step 1 cannot continue this folder: one line, nothing lost.
    before = open(os.path.join(step1_dir, "checkpoint.pth.tar"), "rb").read()
    refused = run_sh(1, dict(env, ARCH="reactnet_a", EPOCHS="3", SAVE=step1_dir), "--device", "cpu", cwd=REPO)
    errors = [line for line in refused.stdout.splitlines() if line.startswith("error:")]  # run.sh tees stderr
    assert refused.returncode != 0 and "Traceback" not in refused.stdout and len(errors) == 1
    assert "--arch reactnet_18, not reactnet_a" in errors[0]
    assert open(os.path.join(step1_dir, "checkpoint.pth.tar"), "rb").read() == before
