"""The OPs counter and ``python -m tools.summary`` against ReActNet-A's cost worked out by hand.

The expected numbers come from the architecture: a stride-2 stem, then 13 blocks,
each a full 3x3 conv C->C and 1x1 conv(s) C->C' (two C->C convs when C' = 2C), then fc.
"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, main_error_line
from models import count_ops, reactnet
from tools import summary

WIDTHS = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
PARAMS_AT_1000_CLASSES = 29_343_592  # ReActNet-A at 1000 classes


def block_shapes(image_size):
    """(in channels, out channels, output side) of every block; the stem halves the side first."""
    side = image_size // 2
    shapes = []
    for cin, cout in zip(WIDTHS, WIDTHS[1:]):
        if cout == 2 * cin and cout != 64:  # widening blocks downsample, except 32 -> 64
            side //= 2
        shapes.append((cin, cout, side))
    return shapes


def binary_conv_macs(image_size):
    """3x3 conv: side^2 * C * C * 9; 1x1 conv(s): side^2 * C * C' (two C->C convs also make C * 2C)."""
    return sum(side * side * cin * (9 * cin + cout) for cin, cout, side in block_shapes(image_size))


def binary_conv_weights():
    return sum(cin * (9 * cin + cout) for cin, cout, _ in block_shapes(224))


def stem_macs(image_size):
    side = image_size // 2
    return side * side * 32 * 3 * 3 * 3


FC_MACS = 1024 * 1000


@pytest.fixture(scope="module")
def step2_model():
    torch.manual_seed(0)
    return reactnet(1000, binary_weights=True)


@pytest.fixture(scope="module")
def step2_at_224(step2_model):
    return count_ops(step2_model, 224)


def test_hand_arithmetic_matches_the_published_counts():
    assert binary_conv_macs(224) == 4_816_896_000
    assert stem_macs(224) == 112 * 112 * 32 * 27 == 10_838_016
    assert stem_macs(224) + FC_MACS == 11_862_016


def test_step2_totals_at_224(step2_at_224):
    counts = step2_at_224
    assert counts["bops"] == binary_conv_macs(224)
    assert counts["bops"] == pytest.approx(4.817e9, rel=1e-3)
    assert counts["flops"] == stem_macs(224) + FC_MACS
    assert counts["flops"] == pytest.approx(1.186e7, rel=1e-3)
    assert counts["ops"] == counts["bops"] / 64 + counts["flops"]
    assert counts["ops"] == pytest.approx(8.71e7, rel=1e-3)


def test_step2_parameters_and_size(step2_at_224):
    counts = step2_at_224
    binary = binary_conv_weights()
    assert counts["params"] == PARAMS_AT_1000_CLASSES
    assert counts["params_binary"] == binary == 28_253_184
    assert counts["params_real"] == PARAMS_AT_1000_CLASSES - binary
    assert counts["size_mb"] == pytest.approx((binary / 8 + (PARAMS_AT_1000_CLASSES - binary) * 4) / 1e6)
    assert counts["size_mb"] == pytest.approx(7.89328)


def test_layer_rows(step2_at_224):
    layers = step2_at_224["layers"]
    # stem + 13 3x3 convs + 8 single 1x1 convs + 5 pairs of 1x1 convs + fc
    assert len(layers) == 1 + 13 + 8 + 2 * 5 + 1
    assert (layers[0]["name"], layers[0]["kind"]) == ("feature.0.conv1", "real")
    assert (layers[0]["input_shape"], layers[0]["output_shape"]) == ((1, 3, 224, 224), (1, 32, 112, 112))
    assert (layers[0]["macs"], layers[0]["params"]) == (stem_macs(224), 32 * 3 * 9)
    fc = layers[-1]
    assert (fc["name"], fc["kind"], fc["params"]) == ("fc", "real", 1024 * 1000 + 1000)
    assert all(row["kind"] == "binary" for row in layers[1:-1])
    assert sum(r["macs"] for r in layers if r["kind"] == "binary") == step2_at_224["bops"]
    assert sum(r["macs"] for r in layers if r["kind"] == "real") == step2_at_224["flops"]
    assert sum(r["params"] for r in layers if r["kind"] == "binary") == step2_at_224["params_binary"]


def test_smaller_image_scales_the_convs_but_not_fc(step2_model, step2_at_224):
    # 32 = 224 / 7 and both are multiples of 32, so every feature map side shrinks by exactly 7.
    small = count_ops(step2_model, 32)
    for big_row, small_row in zip(step2_at_224["layers"], small["layers"]):
        expected = big_row["macs"] if big_row["name"] == "fc" else big_row["macs"] // 49
        assert small_row["macs"] == expected
    assert small["bops"] == 4_816_896_000 // 49 == binary_conv_macs(32)
    assert small["flops"] == 10_838_016 // 49 + FC_MACS
    assert small["params"] == step2_at_224["params"]


def test_step1_binary_input_convs_count_as_flops():
    model = reactnet(1000, binary_weights=False)
    counts = count_ops(model, 64)
    assert counts["bops"] == 0
    assert counts["flops"] == binary_conv_macs(64) + stem_macs(64) + FC_MACS == 395_124_736
    assert counts["ops"] == counts["flops"]
    assert counts["params_binary"] == 0
    assert counts["params_real"] == PARAMS_AT_1000_CLASSES
    assert counts["size_mb"] == pytest.approx(PARAMS_AT_1000_CLASSES * 4 / 1e6)
    assert {row["kind"] for row in counts["layers"]} == {"real"}


def test_training_mode_is_restored(step2_model):
    step2_model.train()
    count_ops(step2_model, 32)
    assert step2_model.training


@pytest.mark.slow
def test_cli_prints_table_and_totals():
    # Run as documented, from the repository root, in a fresh interpreter.
    result = subprocess.run([sys.executable, "-m", "tools.summary", "--image_size", "32"],
                            capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "ReActNet-A, step 2 (binary weights), 1000 classes, 32x32 input"
    assert lines[1].split() == ["layer", "kind", "input", "output", "MACs", "params"]
    assert lines[2].split() == ["feature.0.conv1", "real", "1x3x32x32", "1x32x16x16", "221,184", "864"]
    bops, flops = 4_816_896_000 // 49, 10_838_016 // 49 + FC_MACS
    totals = {line.split(":")[0]: line.split()[1] for line in lines[-5:]}
    assert totals == {"BOPs": f"{bops:,}", "FLOPs": f"{flops:,}", "OPs": f"{bops // 64 + flops:,}",
                      "params": f"{PARAMS_AT_1000_CLASSES:,}", "size": "7.89"}


def test_cli_reads_step_and_classes_from_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "step1.pth"
    torch.save({"state_dict": reactnet(5).state_dict(), "step": 1}, path)
    summary.main(["--image_size", "32", "--checkpoint", str(path)])
    out = capsys.readouterr().out
    assert out.startswith("ReActNet-A, step 1 (real weights), 5 classes, 32x32 input\n")
    assert "BOPs:                 0" in out


def test_cli_bad_input_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "missing.pth"
    assert main_error_line(summary.main, ["--checkpoint", missing], capsys) == \
        f"error: no checkpoint file at {missing}"
