"""tools/export_lce.py: a trained demo model run as a 1-bit network by Larq Compute Engine.

These tests need LCE's own environment (tools/lce/requirements.txt in .lce_env/ or $LCE_ENV). It is
created on first use; when that fails, the tests fail: they are never skipped.
"""
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import evaluate
from conftest import (REPO, evaluate_args, last_val_line, main_error_line, run_sh, run_tool, single_error_line,
                      succeeded)
from models import RunSpec
from models.checkpoint import read_checkpoint
from models.reactnet import BasicBlock, reactnet
from tools import export_lce
from tools.make_demo_data import write_dataset
from utils.data import make_loader, on_device, open_split

EXPORT_SIZE = 96  # the smallest size LCE exports correctly (see MIN_EXPORT_SIZE)
LAST_LINE = re.compile(r"^export: (\d+) of 31 binary convolutions as LceBconv2d, top-1 agreement "
                       r"([\d.]+)% on (\d+) images, size ([\d.]+) MB$")


@pytest.fixture(scope="module")
def lce_env():
    """The Python of the LCE environment, installed here if it is missing."""
    return export_lce.lce_python(export_lce.default_lce_env())


def export(checkpoint, data, out, *extra):
    """``python -m tools.export_lce`` from the repository root, as the README runs it."""
    return run_tool("export_lce", "--checkpoint", checkpoint, "--data", data, "--out", out,
                    "--image_size", EXPORT_SIZE, "-j", 0, "--bench_runs", 2, *extra, timeout=900)


def last_line(result):
    succeeded(result)
    match = LAST_LINE.match(result.stdout.strip().splitlines()[-1])
    assert match, result.stdout[-3000:]
    return match


@pytest.fixture(scope="module")
def demo(lce_env, teacher_weights, tmp_path_factory):
    """A step-2 model trained from scratch by step2/run.sh for two epochs (the first at a nonzero
    learning rate) on demo data with 50 validation images per class, and its export."""
    root = tmp_path_factory.mktemp("lce_demo")
    data = str(root / "data")
    write_dataset(data, 3, {"train": 16, "val": 50}, 40, seed=0)
    env = {"DATA": data, "EPOCHS": "2", "BATCH_SIZE": "16", "IMAGE_SIZE": "32", "TEACHER": "resnet18",
           "TEACHER_WEIGHTS": teacher_weights, "WORKERS": "0", "SAVE": str(root / "step2"),
           "STEP1_CHECKPOINT": "none", "NGPUS": "1"}
    succeeded(run_sh(2, env, "--device", "cpu", "--no_metrics", cwd=str(root)))
    checkpoint = str(root / "step2" / "model_best.pth.tar")
    out = root / "lce"
    result = export(checkpoint, data, out)
    assert (out / "report.json").exists(), result.stderr[-3000:]
    with open(out / "report.json") as f:
        report = json.load(f)
    return {"root": root, "data": data, "checkpoint": checkpoint, "out": out, "result": result,
            "report": report}


@pytest.mark.slow
def test_trained_model_exports_fully_binary_and_agrees(demo):
    match = last_line(demo["result"])
    report = demo["report"]
    assert report["verified"] is True and report["problems"] == []
    # Only the outputs are left in --out: no images, no work folder, no temporary name.
    assert sorted(os.listdir(demo["out"])) == ["lce.log", "model.tflite", "report.json"]
    assert int(match.group(1)) == report["binary_convs"] == 31
    assert float(match.group(2)) == round(report["agreement"], 2)
    assert int(match.group(3)) == report["images"] == 150 and report["classes"] == 3
    assert float(match.group(4)) == round(os.path.getsize(demo["out"] / "model.tflite") / 1e6, 2)
    # The file shipped is the one that ran.
    shipped = hashlib.sha256((demo["out"] / "model.tflite").read_bytes()).hexdigest()
    assert report["tflite_sha256"] == report["checked_sha256"] == shipped
    # Every disagreement is one that near-zero sign flips account for.
    disagreements = report["disagreements"]
    assert disagreements["unexplained"] == 0
    assert disagreements["images"] == disagreements["after_sign_flips"] + disagreements["within_rounding"]
    assert all(r["unexplained"] == 0 == r["nonfinite"] for r in report["own_run"])
    # The census: every binary conv bit-packed, the stem the only float conv.
    assert report["census"]["LceBconv2d"] == 31 and report["census"]["CONV_2D"] == 1
    assert report["parts_census"]["LceBconv2d"] == 31 and report["parts_census"]["CONV_2D"] == 1
    assert report["packed_weight_bytes"] < report["tflite_bytes"] < report["state_dict_bytes"] / 20
    assert set(report["latency_ms"]) == {"lce_bgemm", "lce_indirect_bgemm", "pytorch_binarized_once",
                                         "published_forward"}
    assert report["kernels_max_diff"] <= 1e-4


@pytest.fixture(scope="module")
def flip_prone(lce_env, tmp_path_factory):
    """A model whose top-1 float32 rounding changes on some images, and its export at the defaults:
    ReActNet-A with random mixed-sign weights and the BatchNorm statistics of its inputs (13 blocks
    of random binary features, many signs near 0), its classifier fitted by least squares to its
    pooled features of 20 generated images of each of 6 classes, so that its predictions spread
    over the classes."""
    root = tmp_path_factory.mktemp("flip_prone")
    data = str(root / "data")
    write_dataset(data, 6, {"train": 0, "val": 20}, 120, seed=0)
    dataset = open_split(data, "val", RunSpec(image_size=EXPORT_SIZE))
    loader = make_loader(dataset, [(i, 0) for i in range(len(dataset))], 64, 0, False)
    images, labels = zip(*[(x, batch.target) for batch, x in on_device(loader, torch.device("cpu"))])
    images, labels = torch.cat(images), torch.cat(labels)
    model = calibrated(reactnet(6, binary_weights=True), images, seed=1)
    with torch.no_grad():
        features = torch.nn.Sequential(*model.feature, model.pool1, torch.nn.Flatten())(images)
        features = torch.cat([features, torch.ones(len(features), 1)], dim=1)
        fitted = torch.linalg.lstsq(features, F.one_hot(labels, 6).float()).solution
        model.fc.weight.copy_(fitted[:-1].T)
        model.fc.bias.copy_(fitted[-1])
    checkpoint = root / "model.pth.tar"
    torch.save({"step": 2, "state_dict": model.state_dict()}, checkpoint)
    out = root / "lce"
    result = export(checkpoint, data, out, "--bench_runs", 1)
    with open(out / "report.json") as f:
        return {"result": result, "report": json.load(f)}


@pytest.mark.slow
def test_disagreements_that_sign_flips_explain_are_verified(flip_prone):
    """LCE's top-1 differs from PyTorch's on some images (96.7% agreement here), each after a
    near-zero sign flipped: a right file, verified at the defaults."""
    match = last_line(flip_prone["result"])
    report = flip_prone["report"]
    assert report["verified"] is True and report["problems"] == []
    assert int(match.group(3)) == report["images"] == 120 and report["classes"] == 6
    assert report["top_class_share"] < 50
    disagreements = report["disagreements"]
    assert disagreements["images"] > 0 and disagreements["unexplained"] == 0
    assert disagreements["images"] == disagreements["after_sign_flips"] + disagreements["within_rounding"]
    assert report["agreement"] == pytest.approx(100 - 100 * disagreements["images"] / 120)
    # More images leave the model's own run, at near-zero signs, than change their top-1.
    assert sum(r["departed"] for r in report["own_run"]) >= disagreements["after_sign_flips"]
    assert all(r["unexplained"] == 0 for r in report["own_run"])


@pytest.mark.slow
@pytest.mark.parametrize("check", ["parts", "chain", "as_exported"])
def test_every_part_matches_pytorch_on_its_own_input(demo, check):
    """Each part fed PyTorch's input (parts.tflite), each part of model.tflite's chain fed LCE's own
    output of the part before it, and each part of as_exported's copy against the model on the
    model's own run, on every image."""
    parts = demo["report"][check]
    assert [p["part"] for p in parts] == [f"feature.{i}" for i in range(14)] + ["head"]
    images = 4 if check == "parts" else 150
    assert parts[-1]["positions"] == images
    for part in parts:
        assert part["unexplained"] == 0 == part["nonfinite"], part
        assert part["max_diff"] <= 1e-2, part
        assert part["near_zero_positions"] <= export_lce.MAX_EXCUSED_SHARE * part["positions"], part
    # Only the blocks binarize; the stem and the head are compared everywhere.
    assert parts[0]["near_zero_positions"] == parts[-1]["near_zero_positions"] == 0
    assert demo["report"]["probe_differing_images"] == 0 and demo["report"]["probe_logit_diff"] == 0


# model.tflite alone with blocks feature.8 and feature.9 swapped (both 512 -> 512 channels); the parts and the probe are built as they should be.
SWAP_BLOCKS_8_AND_9 = """
import sys
from tools.lce import convert
chain = convert.full_model
def swapped(net, spec, probe=False):
    parts = spec["parts"]
    if not probe:
        spec = dict(spec, parts=parts[:8] + [parts[9], parts[8]] + parts[10:])
    return chain(net, spec, probe)
convert.full_model = swapped
convert.main(*sys.argv[1:])
"""


def few_images(demo, out):
    """Arguments of an export of the demo model on 6 images: too few to verify, enough to show
    what else a check finds."""
    return ("--checkpoint", demo["checkpoint"], "--data", demo["data"], "--out", out, "--image_size", EXPORT_SIZE,
            "--max_images", 6, "--part_images", 1, "--bench_runs", 1, "-j", 0)


def rejected_report(out):
    """report.json of a rejected export: no model.tflite was left behind."""
    assert not (out / "model.tflite").exists() and (out / export_lce.REJECTED).exists()
    with open(out / "report.json") as f:
        report = json.load(f)
    assert report["verified"] is False and report["problems"]
    return report


@pytest.mark.slow
def test_wrong_model_file_fails_the_export(demo, tmp_path, capsys, monkeypatch):
    """A model.tflite that computes something else than its checked parts fails, whatever its
    top-1 agreement; it is kept under another name and report.json says why."""
    out = tmp_path / "lce"
    (out / "model.tflite").parent.mkdir()
    monkeypatch.setattr(export_lce, "CONVERTER", ["-c", SWAP_BLOCKS_8_AND_9])
    line = expect_error(capsys, *few_images(demo, out))
    assert "model.tflite's logits are not bit for bit its chain's on 6 images" in line
    assert sorted(os.listdir(out)) == ["lce.log", export_lce.REJECTED, "report.json"]
    report = rejected_report(out)
    assert report["probe_logit_diff"] > 1e-2
    assert all(p["unexplained"] == 0 for p in report["parts"] + report["chain"])


@pytest.mark.slow
def test_pytorch_side_equals_evaluate(demo, capsys):
    """The reference the export is compared with is evaluate.py's model on evaluate.py's images."""
    evaluate.main([str(a) for a in evaluate_args(demo["data"], demo["checkpoint"])] + ["--image_size", str(EXPORT_SIZE)])
    line = last_val_line(capsys.readouterr().out)
    assert line.startswith(f" * acc@1 {demo['report']['top1_pytorch']:.3f} ")


@pytest.fixture(scope="module")
def released_one_image(demo, tmp_path_factory):
    """An AdamBNN-style released file (nn.DataParallel prefixes, no step metadata) of the demo model,
    exported on one image."""
    root = tmp_path_factory.mktemp("released")
    state_dict = read_checkpoint(demo["checkpoint"])["state_dict"]
    path = root / "released.pth.tar"
    torch.save({"epoch": 2, "state_dict": {"module." + k: v for k, v in state_dict.items()},
                "best_top1_acc": 50.0, "optimizer": {}}, path)
    result = export(path, demo["data"], root / "lce", "--max_images", 1, "--part_images", 1, "--bench_runs", 1)
    with open(root / "lce" / "report.json") as f:
        return {"out": root / "lce", "result": result, "report": json.load(f)}


@pytest.mark.slow
def test_released_format_exports_the_same_flatbuffer(demo, released_one_image):
    """The very same bytes as our checkpoint's. (ReActNet's flat ``.weights`` load into the same
    model: test_checkpoint.py.)"""
    rejected = released_one_image["out"] / export_lce.REJECTED
    assert rejected.read_bytes() == (demo["out"] / "model.tflite").read_bytes()


@pytest.mark.slow
def test_one_image_is_too_few_to_verify(released_one_image):
    """Every check passes on one image, and still the export is not verified."""
    line = single_error_line(released_one_image["result"])
    report = released_one_image["report"]
    minimum = (f"too few images to verify: 1 compared, with 1 distinct labels; a verified export needs at "
               f"least {export_lce.MIN_IMAGES} images of at least 3 classes (raise --max_images)")
    assert report["verified"] is False and report["problems"] == [minimum]
    assert minimum in line


def test_tolerance_follows_each_channels_largest_value():
    """A trained model's outputs near 0 carry the rounding error of their channel's large terms:
    1e-5 of a channel reaching 20 is within the tolerance, the same error in a channel reaching
    0.5 is not, unless a near-zero pre-sign value reaches that position."""
    expected = torch.tensor([[[[20.0, 0.24], [1.0, -3.0]], [[0.5, 0.24], [0.1, -0.2]]]])
    nowhere = torch.zeros(1, 2, 2, dtype=torch.bool)
    actual = expected.clone()
    actual[0, 0, 0, 1] += 2e-4
    assert export_lce.compare(expected, actual, nowhere)["unexplained"] == 0
    actual[0, 1, 0, 1] += 2e-4
    result = export_lce.compare(expected, actual, nowhere)
    assert result["unexplained"] == 1 and result["differing_positions"] == 1
    there = nowhere.clone()
    there[0, 0, 1] = True
    result = export_lce.compare(expected, actual, there)
    assert result["unexplained"] == 0 and result["near_zero_positions"] == 1


def test_near_zero_budget_follows_the_rounding_before_each_sign():
    """The first sign sees the block's input plus a shift, computed alike on both sides: only a
    value within --sign_eps of 0 may flip. The second sees the output of a folded BatchNorm:
    within SIGN_MARGIN times the image's measured rounding error of 0 it may flip, and its 1x1
    conv carries the flip to its own position only."""
    block = BasicBlock(2, 2, 1, True)
    first, second = torch.ones(2, 2, 3, 3), torch.ones(2, 2, 3, 3)
    expected = torch.zeros(2, 2, 3, 3)
    actual = expected.clone()
    actual[0, 1, 2, 0], actual[1, 0, 0, 2] = 2.5e-5, 1e-7  # budgets: 1e-4 and --sign_eps
    first[0, 1, 0, 0] = 5e-5  # beyond --sign_eps
    second[0, 1, 1, 1] = 1.5e-4  # beyond image 0's budget
    second[1, 0, 2, 2] = 9e-5  # beyond image 1's
    flagged = export_lce.near_zero_positions(block, (first, second), 1e-5, expected, actual)
    assert not flagged.any()
    second[0, 0, 2, 2] = 9e-5  # within image 0's
    flagged = export_lce.near_zero_positions(block, (first, second), 1e-5, expected, actual)
    assert flagged.nonzero().tolist() == [[0, 2, 2]]
    first[0, 1, 0, 0] = 0.0
    flagged = export_lce.near_zero_positions(block, (first, second), 1e-5, expected, actual)
    assert flagged.nonzero().tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [0, 2, 2]]


def test_measured_error_leaves_out_positions_where_a_sign_flipped():
    """A position with a value beyond the tolerance, or one a near-zero first sign reaches, is
    where a sign may have flipped: its other channels' differences are not rounding."""
    expected = torch.zeros(2, 2, 2, 2)
    actual = expected.clone()
    actual[0, 0, 0, 0], actual[1, 0, 0, 1] = 3e-5, 7e-5
    actual[0, 0, 1, 1], actual[0, 1, 1, 1] = 0.5, 5e-4  # a flipped position
    actual[1, 1, 1, 0] = 9e-5  # at an excluded position
    excluded = torch.zeros(2, 2, 2, dtype=torch.bool)
    excluded[1, 1, 0] = True
    assert export_lce.measured_error(expected, actual, excluded).tolist() == pytest.approx([3e-5, 7e-5])


def test_values_that_are_not_finite_are_never_within_nor_excused():
    """NaN compares False with everything: it must count as a difference, even at a position a
    near-zero sign reaches, and must not hide the rounding measured elsewhere."""
    expected = torch.zeros(1, 2, 2, 2)
    actual = expected.clone()
    actual[0, 0, 0, 0] = float("nan")  # at a near-zero position
    actual[0, 1, 1, 1] = float("inf")
    actual[0, 0, 1, 0] = 3e-5  # rounding
    near_zero = torch.zeros(1, 2, 2, dtype=torch.bool)
    near_zero[0, 0, 0] = True
    result = export_lce.compare(expected, actual, near_zero)
    assert result["nonfinite"] == 2 and result["differing_positions"] == 2 and result["unexplained"] == 0
    assert result["max_diff"] == pytest.approx(3e-5)
    assert export_lce.measured_error(expected, actual, torch.zeros_like(near_zero)).tolist() == pytest.approx([3e-5])
    # A non-finite value of PyTorch's does not widen its channel's tolerance.
    assert torch.isfinite(export_lce.channel_tolerance(actual)).all()


def test_first_sign_budget_widens_by_the_drift_between_the_inputs():
    """On the two sides' own runs, a block's inputs differ by rounding: a first pre-sign value
    within that drift of 0 may have either sign."""
    block = BasicBlock(2, 2, 1, True)
    first, second = torch.ones(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    first[0, 1, 1, 1] = 3e-5
    outputs = torch.zeros(1, 2, 3, 3)
    drift = torch.zeros(1, 2, 3, 3)
    assert not export_lce.near_zero_positions(block, (first, second), 1e-5, outputs, outputs, drift).any()
    drift[0, 1, 1, 1] = 2.5e-5
    assert export_lce.near_zero_positions(block, (first, second), 1e-5, outputs, outputs, drift).all()


def test_an_image_leaves_the_models_run_only_where_a_near_zero_sign_reaches():
    """Image 0 follows the model's run; image 1 leaves it where no sign is near 0 (unexplained);
    image 2 where a pre-sign value of exactly 0 reaches (explained); image 3 there too, but with
    a NaN, which no sign flip explains."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6)
    block = calibrated(BasicBlock(8, 8, 1, True), x, seed=5)
    x[2:, :, 2, 3] = -block.move11.bias.detach().flatten()  # every channel's first pre-sign value 0
    with torch.no_grad():
        lce = block(x)
    lce[1, 0, 0, 0] += 1
    lce[2, :, 2, 3] += 1
    lce[3, 0, 2, 3] = float("nan")
    parts = [("block.", export_lce.as_exported(block))]
    chain, copy_check, own_run, departed_at, explained, _ = export_lce.check_batch(
        parts, [("block.", block)], x, [lce], 1e-5)
    assert departed_at.tolist() == [1, 0, 0, 0] and explained.tolist() == [True, False, True, False]
    assert own_run == [{"part": "block", "departed": 1, "unexplained": 2, "nonfinite": 0}]
    assert chain[0]["unexplained"] == 1 and chain[0]["nonfinite"] == 1
    assert copy_check[0]["unexplained"] == 0 == copy_check[0]["nonfinite"]


# Small cases, one LCE conversion for all: blocks with mixed-sign weights and BatchNorm statistics
# of their own input, as a trained network has.

def calibrated(block, x, seed):
    """``block`` (a block or a whole network) with random mixed-sign latent weights and shifts, and
    the BatchNorm statistics of its own input ``x``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            module = name.split(".")[-2]
            if module.startswith("move"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif module.startswith("binary_"):
                p.copy_(torch.randn(p.shape, generator=g))
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # a cumulative average: one batch sets the statistics
        block.train()(x)
    return block.eval()


@pytest.fixture(scope="module")
def small_cases(lce_env, tmp_path_factory):
    torch.manual_seed(0)
    even, padded, zeros, x = (torch.randn(2, 8, n, n) for n in (6, 5, 4, 4))
    cases = {"stride2": (calibrated(BasicBlock(8, 16, 2, True), even, 1), even),
             "zero_padding": (calibrated(BasicBlock(8, 8, 1, True), padded, 2), padded),
             "sign_of_zero": (calibrated(BasicBlock(8, 8, 1, True), zeros, 3), zeros),
             "zero_weights": (calibrated(BasicBlock(8, 8, 1, True), x, 4), x)}
    # Every channel's pre-sign value exactly 0 at one position of the first image.
    zeros[0, :, 1, 2] = -cases["sign_of_zero"][0].move11.bias.detach().flatten()
    with torch.no_grad():
        cases["zero_weights"][0].binary_3x3.weight[:, 0, 1, 1] = 0
        cases["zero_weights"][0].binary_pw.weight[0, :3] = 0
    named = [(f"{name}.", export_lce.as_exported(block)) for name, (block, _) in cases.items()]
    comparisons, report, outputs = export_lce.verify_parts(
        named, [x for _, x in cases.values()], lce_env, str(tmp_path_factory.mktemp("small")), sign_eps=0)
    outputs = {name: export_lce.nchw(outputs[f"part_{i}"]) for i, name in enumerate(cases)}
    return {"cases": cases, "report": report, "outputs": outputs, **{c["part"]: c for c in comparisons}}


def binary_conv(block, x, pad):
    """The first binary conv of ``block`` with explicit (left, right, top, bottom) zero padding."""
    binary = torch.sign(block.move11(x))
    weight = block.binary_3x3.weight_binarizer(block.binary_3x3.weight)
    return F.conv2d(F.pad(binary, pad), weight, stride=block.stride)


@pytest.mark.slow
def test_small_cases_are_fully_binary(small_cases):
    assert small_cases["report"]["parts"]["ops"]["LceBconv2d"] == 3 + 2 + 2 + 2
    assert "CONV_2D" not in small_cases["report"]["parts"]["ops"]
    assert small_cases["report"]["kernels_max_diff"] <= 1e-4


@pytest.mark.slow
def test_stride2_on_even_size_aligns_as_pytorch(small_cases):
    block, x = small_cases["cases"]["stride2"]
    with torch.no_grad():  # the case tells the alignments apart: TF's "same" pads after
        assert not torch.allclose(binary_conv(block, x, (1, 0, 1, 0)), binary_conv(block, x, (0, 1, 0, 1)))
    result = small_cases["stride2"]
    assert result["near_zero_positions"] == 0 and result["differing_positions"] == 0
    assert result["max_diff"] < 1e-4


@pytest.mark.slow
def test_binary_conv_pads_with_zeros(small_cases):
    block, x = small_cases["cases"]["zero_padding"]
    with torch.no_grad():  # the case tells zero from +1 padding apart
        plus_one = F.conv2d(F.pad(torch.sign(block.move11(x)), (1, 1, 1, 1), value=1.0),
                            block.binary_3x3.weight_binarizer(block.binary_3x3.weight))
        assert not torch.allclose(binary_conv(block, x, (1, 1, 1, 1)), plus_one)
    result = small_cases["zero_padding"]
    assert result["near_zero_positions"] == 0 and result["differing_positions"] == 0
    assert result["max_diff"] < 1e-4


@pytest.mark.slow
def test_sign_of_zero_is_plus_one_in_the_flatbuffer(small_cases):
    """Every channel's pre-sign value exactly 0 at one position: LCE's output is PyTorch's with
    sign(0) taken as +1 everywhere, and not the -1 reading."""
    block, x = small_cases["cases"]["sign_of_zero"]
    exported = export_lce.as_exported(block)
    actual = small_cases["outputs"]["sign_of_zero"]
    within = {}
    for value in (1.0, -1.0):
        exported.binary_activation.forward = lambda v, value=value: torch.where(v == 0, value, torch.sign(v))
        with torch.no_grad():
            expected = exported(x)
        within[value] = bool(((actual - expected).abs() <= export_lce.channel_tolerance(expected)).all())
    assert within == {1.0: True, -1.0: False}


@pytest.mark.slow
def test_sign_of_zero_differs_only_where_counted(small_cases):
    """PyTorch's sign(0) is 0, LCE's +1: outputs differ, but only where the exact zero reaches."""
    result = small_cases["sign_of_zero"]
    assert result["near_zero_positions"] == 9  # the 3x3 neighbourhood of the zero, first image
    assert 0 < result["differing_positions"] <= result["near_zero_positions"]
    assert result["unexplained"] == 0
    assert result["max_diff"] < 1e-4


# Bad input: one error line, non-zero exit, no traceback.

def expect_error(capsys, *argv):
    return main_error_line(export_lce.main, argv, capsys)


def test_missing_checkpoint(tmp_path, capsys):
    line = expect_error(capsys, "--checkpoint", tmp_path / "missing.pth.tar", "--data", tmp_path,
                        "--out", tmp_path / "out", "--image_size", EXPORT_SIZE)
    assert "missing.pth.tar" in line


def test_step1_checkpoint_refused(tmp_path, capsys):
    path = tmp_path / "step1.pth.tar"
    torch.save({"step": 1, "state_dict": reactnet(3).state_dict()}, path)
    line = expect_error(capsys, "--checkpoint", path, "--data", tmp_path, "--out", tmp_path / "out")
    assert "step-1" in line


@pytest.mark.slow
def test_missing_data_folder(demo, tmp_path, capsys):
    line = expect_error(capsys, "--checkpoint", demo["checkpoint"], "--data", tmp_path / "nowhere",
                        "--image_size", EXPORT_SIZE)
    assert "val" in line


def test_size_lce_pads_wrongly_refused(tmp_path, capsys):
    line = expect_error(capsys, "--checkpoint", tmp_path / "any.pth.tar", "--data", tmp_path,
                        "--image_size", 64)
    assert "--image_size" in line and "96" in line


@pytest.mark.parametrize("kind", ["below_a_file", "not_a_venv"])
def test_environment_that_cannot_be_made(tmp_path, capsys, kind):
    (tmp_path / "file").write_text("")
    if kind == "below_a_file":
        env = tmp_path / "file" / "env"
    else:
        env = tmp_path / "folder"
        env.mkdir()
        (env / "keep.txt").write_text("not to be deleted")
    line = expect_error(capsys, "--setup_only", "--lce_env", env)
    assert str(env) in line
    assert kind == "below_a_file" or (env / "keep.txt").exists()


@pytest.mark.slow
def test_broken_environment_reported_with_its_log(demo, tmp_path, capsys):
    """An environment stamped as complete but without LCE: the LCE side fails, in one line."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    with open(export_lce.REQUIREMENTS, "rb") as f:
        (env / export_lce.STAMP).write_text(hashlib.sha256(f.read()).hexdigest())
    out = tmp_path / "out"
    line = expect_error(capsys, "--checkpoint", demo["checkpoint"], "--data", demo["data"], "--out", out,
                        "--image_size", EXPORT_SIZE, "--max_images", 2, "-j", 0, "--lce_env", env)
    assert "LCE conversion failed" in line and str(out / "lce.log") in line
    assert "No module named" in (out / "lce.log").read_text()


# --setup_only with another requirements file and import check: argv is REQUIREMENTS LCE_MODULE ENV.
SETUP_WITH = """
import sys
from tools import export_lce
export_lce.REQUIREMENTS, export_lce.LCE_MODULE = sys.argv[1:3]
export_lce.main(["--setup_only", "--lce_env", sys.argv[3]])
"""


@pytest.mark.slow
def test_two_setups_at_once_install_once(tmp_path):
    """The second waits for the first's lock, then finds the environment ready."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install\n")
    env = tmp_path / "env"
    command = [sys.executable, "-c", SETUP_WITH, str(requirements), "json", str(env)]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    printed = "".join(out for out, _ in outputs)
    assert printed.count("=> installing") == 1 and printed.count("LCE environment ready") == 2, printed
    assert (env / "pyvenv.cfg").is_file() and (env / export_lce.STAMP).is_file()


def test_environment_is_stamped_only_once_it_imports_lce(tmp_path, capsys, monkeypatch):
    """An install that leaves LCE unimportable is an error, and the environment stays unstamped."""
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# nothing to install\n")
    monkeypatch.setattr(export_lce, "REQUIREMENTS", str(requirements))
    env = tmp_path / "env"
    line = expect_error(capsys, "--setup_only", "--lce_env", env)
    assert f"could not import larq_compute_engine in {env}" in line
    assert (env / "pyvenv.cfg").is_file() and not (env / export_lce.STAMP).exists()


@pytest.mark.slow
def test_existing_environment_is_reused(lce_env, capsys):
    assert export_lce.main(["--setup_only"]) is None
    out = capsys.readouterr().out
    assert "installing" not in out and lce_env in out


@pytest.mark.slow
def test_zero_latent_weights_are_exported_as_plus_one(small_cases):
    """A bit has no 0: the flatbuffer binarizes W == 0 to +1, where PyTorch's sign gives 0."""
    block, x = small_cases["cases"]["zero_weights"]
    assert export_lce.zero_weights(block) == 8 + 3
    with torch.no_grad():  # the case tells the two readings apart
        assert not torch.allclose(block(x), export_lce.as_exported(block)(x))
    result = small_cases["zero_weights"]
    assert result["near_zero_positions"] == 0 and result["differing_positions"] == 0
    assert result["max_diff"] < 1e-4
