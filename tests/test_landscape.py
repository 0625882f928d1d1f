"""tools/landscape.py on the tiny dataset: output files, the centre of the grid, filter normalisation."""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import NUM_CLASSES, main_error_line, run_tool
from models import RunSpec, load_checkpoint, reactnet
from tools import landscape
from utils.data import open_split

BATCHES, BATCH_SIZE, IMAGE_SIZE, SEED = 2, 8, 32, 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A freshly initialised step-1 network for the tiny dataset's classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("landscape") / "step1.pth"
    torch.save({"state_dict": reactnet(NUM_CLASSES).state_dict(), "step": 1}, path)
    return str(path)


def run_landscape(checkpoint, data, out, *extra):
    landscape.main(["--checkpoint", checkpoint, "--data", data, "--out", str(out), "--points", "3",
                    "--batches", str(BATCHES), "--batch_size", str(BATCH_SIZE),
                    "--image_size", str(IMAGE_SIZE), "--seed", str(SEED), "-j", "0", "--device", "cpu",
                    *extra])
    return np.load(os.path.join(out, "landscape.npz"))


def checkpoint_loss(checkpoint, data, binary_weights):
    """The checkpoint's cross-entropy on the same training batches, computed without the grid."""
    model = reactnet(NUM_CLASSES, binary_weights=binary_weights)
    load_checkpoint(model, checkpoint)
    model.eval()
    dataset = open_split(data, "train", RunSpec(image_size=IMAGE_SIZE), train=False)
    batches, _ = landscape.cache_batches(dataset, BATCHES, BATCH_SIZE, SEED, 0, torch.device("cpu"))
    total, count = 0.0, 0
    with torch.no_grad():
        for images, targets in batches:
            total += F.cross_entropy(model(images), targets, reduction="sum").item()
            count += len(targets)
    assert count == BATCHES * BATCH_SIZE
    return total / count


def assert_is_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_direction(checkpoint, tiny_data, tmp_path):
    result = run_landscape(checkpoint, tiny_data, tmp_path, "--dim", "1", "--span", "0.5")
    assert result["x"].tolist() == [-0.5, 0.0, 0.5]
    assert "y" not in result.files
    assert result["losses"].shape == (3,)
    assert int(result["step"]) == 1 and int(result["num_images"]) == BATCHES * BATCH_SIZE
    assert result["losses"][1] == checkpoint_loss(checkpoint, tiny_data, binary_weights=False)
    assert np.all(np.isfinite(result["losses"]))
    assert_is_png(tmp_path / "landscape.png")


def test_two_directions_of_the_binary_network(checkpoint, tiny_data, tmp_path):
    result = run_landscape(checkpoint, tiny_data, tmp_path, "--dim", "2", "--step", "2")
    assert result["x"].tolist() == result["y"].tolist() == [-1.0, 0.0, 1.0]
    losses = result["losses"]
    assert losses.shape == (3, 3)
    assert int(result["step"]) == 2
    assert losses[1, 1] == checkpoint_loss(checkpoint, tiny_data, binary_weights=True)
    assert np.any(losses != losses[1, 1])  # the directions do move the binary weights
    assert_is_png(tmp_path / "landscape.png")


def test_grid_has_an_exact_zero_at_its_centre():
    coordinates = landscape.grid_coordinates(7, 0.3)
    assert coordinates[3] == 0.0
    assert coordinates[0] == -0.3 and coordinates[-1] == 0.3
    np.testing.assert_allclose(np.diff(coordinates), 0.1)


def test_filter_normalise_by_hand():
    weight = torch.tensor([[3.0, 4.0], [0.0, 5.0]])    # filter norms 5 and 5
    direction = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # filter norms 1 and 2
    expected = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert torch.equal(landscape.filter_normalise(direction, weight), expected)


@pytest.mark.parametrize("binary_weights", [False, True])
def test_each_filter_of_a_direction_has_the_norm_of_the_weight_filter(binary_weights):
    torch.manual_seed(0)
    model = reactnet(NUM_CLASSES, binary_weights=binary_weights)
    direction = landscape.random_direction(model, torch.Generator().manual_seed(1))
    weights = dict(model.named_parameters())
    conv_and_fc = {name for name in weights if name.endswith(("conv1.weight", "fc.weight"))
                   or ".binary_" in name}
    assert set(direction) == conv_and_fc  # BatchNorm, biases and PReLU slopes stay put
    assert len(direction) == 1 + 13 + 8 + 2 * 5 + 1
    for name, d in direction.items():
        w = weights[name].detach()
        assert d.shape == w.shape
        torch.testing.assert_close(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
        assert not torch.allclose(d, w)


def test_directions_are_fixed_by_the_seed():
    model = reactnet(NUM_CLASSES)
    first = landscape.random_direction(model, torch.Generator().manual_seed(3))
    again = landscape.random_direction(model, torch.Generator().manual_seed(3))
    assert all(torch.equal(first[name], again[name]) for name in first)


def test_missing_checkpoint_is_one_error_line(tiny_data, tmp_path):
    missing = tmp_path / "missing.pth"
    result = run_tool("landscape", "--checkpoint", missing, "--data", tiny_data,
                        "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: no checkpoint file at {missing}"]


def test_even_points_are_refused(checkpoint, tiny_data, tmp_path, capsys):
    line = main_error_line(lambda argv: run_landscape(checkpoint, tiny_data, tmp_path, *argv),
                           ["--points", "4"], capsys)
    assert line.startswith("error: --points must be odd")


def test_an_infinite_span_is_refused(checkpoint, tiny_data, tmp_path, capsys):
    line = main_error_line(lambda argv: run_landscape(checkpoint, tiny_data, tmp_path, *argv),
                           ["--span", "inf"], capsys)
    assert line.startswith("error: argument --span: inf is not a finite number")


def unwritable_folder(tmp_path):
    """A folder this process cannot create files in: a read-only one, or /sys for root, whom
    permissions do not stop."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (str(folder), "/sys"):
        try:
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no folder here refuses writes")


def test_an_out_folder_that_cannot_be_written_is_refused_before_any_loss(checkpoint, tiny_data, tmp_path,
                                                                          capsys):
    out = unwritable_folder(tmp_path)
    line = main_error_line(lambda argv: run_landscape(checkpoint, tiny_data, out), [], capsys)
    assert line.startswith(f"error: cannot write to --out {out} (")
