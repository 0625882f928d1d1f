"""The demo's tools: the synthetic dataset generator and the teacher trainer."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import NUM_CLASSES, run_script, run_tool, train_args, write_image_folder
from tools.make_demo_data import TEXTURES, write_dataset
from utils.distill import build_teacher
from utils.errors import UserError


def read_split(root, split):
    """{class: [pixel arrays in file order]} of one split."""
    folder = os.path.join(root, split)
    return {c: [np.asarray(Image.open(os.path.join(folder, c, f)))
                for f in sorted(os.listdir(os.path.join(folder, c)))]
            for c in sorted(os.listdir(folder))}


def test_generator_writes_an_image_folder(tmp_path):
    out = tmp_path / "data"
    result = run_tool("make_demo_data", "--out", out, "--classes", 3,
                        "--train_per_class", 4, "--val_per_class", 2, "--size", 24)
    assert result.returncode == 0, result.stderr
    assert "chance: 33.3%" in result.stdout
    for split, count in (("train", 4), ("val", 2)):
        images = read_split(out, split)
        assert sorted(images) == sorted(TEXTURES[:3])
        for arrays in images.values():
            assert len(arrays) == count
            assert all(a.shape == (24, 24, 3) and a.dtype == np.uint8 for a in arrays)


def test_generator_is_a_function_of_the_seed(tmp_path):
    counts = {"train": 3, "val": 2}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_dataset(tmp_path / name, 2, counts, 20, seed)
    a, b, c = (read_split(tmp_path / name, "train") for name in "abc")
    for shape in a:
        assert all(np.array_equal(x, y) for x, y in zip(a[shape], b[shape]))
        assert not any(np.array_equal(x, z) for x, z in zip(a[shape], c[shape]))
    # Train and val draw different images from the same seed.
    val = read_split(tmp_path / "a", "val")
    assert not any(np.array_equal(x, y) for x, y in zip(a[TEXTURES[0]], val[TEXTURES[0]]))


def test_mean_colour_does_not_give_the_class(tmp_path):
    """A nearest-centroid classifier on the mean RGB of each image stays near chance."""
    write_dataset(tmp_path, 4, {"train": 60, "val": 60}, 32, seed=0)
    features = {split: {c: np.stack([a.reshape(-1, 3).mean(0) for a in arrays])
                        for c, arrays in read_split(tmp_path, split).items()}
                for split in ("train", "val")}
    centroids = np.stack([features["train"][c].mean(0) for c in sorted(features["train"])])
    correct = total = 0
    for k, c in enumerate(sorted(features["val"])):
        distances = ((features["val"][c][:, None, :] - centroids[None]) ** 2).sum(-1)
        correct += (distances.argmin(1) == k).sum()
        total += len(distances)
    assert correct / total < 0.4  # chance is 0.25


@pytest.mark.parametrize("flags, message", [
    (["--classes", "1"], "--classes must be between 2"),
    (["--size", "4"], "--size must be at least 8"),
])
def test_generator_refuses_bad_input_in_one_line(tmp_path, flags, message):
    result = run_tool("make_demo_data", "--out", tmp_path / "data", *flags)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained_teacher(tiny_data, tmp_path_factory):
    """A resnet18 trained for one epoch on tiny_data by tools/train_teacher.py; returns (path, stdout)."""
    out = tmp_path_factory.mktemp("trained_teacher") / "teacher.pth"
    result = run_tool("train_teacher", "--data", tiny_data, "--arch", "resnet18",
                        "--epochs", 1, "--batch_size", 8, "--image_size", 32, "-j", 0,
                        "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    return str(out), result.stdout


@pytest.mark.slow
def test_teacher_weights_load_as_the_distillation_teacher(trained_teacher):
    path, stdout = trained_teacher
    assert "epoch 1/1" in stdout and "val acc@1" in stdout
    # BatchNorm shifts start at 0 and only gradient updates move them (AdamW's decay of 0 is 0).
    state = torch.load(path, weights_only=True)["state_dict"]
    shifts = [v for k, v in state.items() if "bn" in k and k.endswith(".bias")]  # resnet18: bn1, 2 per block
    assert len(shifts) == 17 and all((v != 0).float().mean() > 0.9 for v in shifts)
    teacher = build_teacher("resnet18", NUM_CLASSES, path)
    assert not teacher.training
    assert teacher(torch.zeros(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    with pytest.raises(UserError, match=f"predict {NUM_CLASSES} classes"):
        build_teacher("resnet18", NUM_CLASSES + 1, path)


@pytest.mark.slow
def test_a_teacher_for_other_classes_is_refused_in_one_line(trained_teacher, tmp_path):
    data = write_image_folder(tmp_path / "data", {"train": 2, "val": 1}, num_classes=NUM_CLASSES + 1)
    result = run_script("step1/train.py", *train_args(data, trained_teacher[0], tmp_path / "run"))
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and f"predict {NUM_CLASSES} classes" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_train_teacher_refuses_an_unknown_architecture_in_one_line(tiny_data, tmp_path):
    result = run_tool("train_teacher", "--data", tiny_data, "--arch", "resnet_nonexistent",
                        "--out", tmp_path / "t.pth")
    assert result.returncode != 0
    assert result.stderr.startswith("error: unknown classification model")
    assert len(result.stderr.strip().splitlines()) == 1
