"""The record knows its classes: every checkpoint and teacher file names its classes in label order,
and a resume, step 2's start, distillation and evaluate.py refuse data whose class folders differ
(renamed, removed, added), in one line naming the first class that differs, instead of training or
scoring with the labels silently permuted."""
import os
import shutil
import sys
import types

import pytest
import torch
import torchvision
from PIL import Image
from timm.data import ImageNetInfo

import evaluate
from conftest import REPO, main_error_line, run_bounded, single_error_line, succeeded, train_args
from models import RunSpec, reactnet
from utils import run_folder, trainer
from utils.distill import build_teacher
from utils.errors import UserError

STEP1 = os.path.join(REPO, "step1", "train.py")
STEP2 = os.path.join(REPO, "step2", "train.py")


def step(script, data, teacher, save, *extra):
    return [sys.executable, script, *map(str, train_args(data, teacher, save, *extra))]


@pytest.fixture(scope="module")
def one_epoch(tiny_data, teacher_weights, tmp_path_factory):
    """The run folder of one step-1 epoch on tiny_data (class_0, class_1, class_2)."""
    save = tmp_path_factory.mktemp("trained")
    succeeded(run_bounded(step(STEP1, tiny_data, teacher_weights, save)))
    return save


def copy_of(folder, tmp_path, name):
    return shutil.copytree(folder, tmp_path / name)


def renamed(tiny_data, tmp_path, old, new):
    """tiny_data with the class folder ``old`` renamed ``new`` in both splits."""
    data = copy_of(tiny_data, tmp_path, "renamed")
    for split in ("train", "val"):
        os.rename(data / split / old, data / split / new)
    return str(data)


def bare_teacher(tmp_path, num_classes):
    """A resnet18 state_dict file, which records no class names."""
    torch.manual_seed(0)
    path = tmp_path / f"teacher{num_classes}.pth"
    torch.save(torchvision.models.resnet18(num_classes=num_classes).state_dict(), path)
    return str(path)


@pytest.mark.slow
def test_a_checkpoint_records_its_classes_in_label_order(one_epoch):
    for name in (run_folder.LAST, run_folder.BEST):
        state = torch.load(one_epoch / name, weights_only=True)
        assert state["classes"] == ["class_0", "class_1", "class_2"]


@pytest.mark.slow
def test_a_resume_on_renamed_class_folders_is_refused(one_epoch, tiny_data, teacher_weights, tmp_path):
    # Same count, labels permuted: class_1 renamed class_9 sorts last.
    data = renamed(tiny_data, tmp_path, "class_1", "class_9")
    save = copy_of(one_epoch, tmp_path, "run")
    before = (save / run_folder.LAST).read_bytes()
    result = run_bounded(step(STEP1, data, teacher_weights, save, "--epochs", 2, "--resume_with_changes"))
    line = single_error_line(result)
    assert line == (f"error: the class folders of {data}/train are not the classes {save}/{run_folder.LAST} "
                    f"was trained on, in label order: class 1 is 'class_1' there but 'class_2' here; "
                    f"'class_1' has no class folder here; restore the class folders it was trained on to "
                    f"resume it, or pass a new --save for a new run on these classes")
    assert (save / run_folder.LAST).read_bytes() == before


@pytest.mark.slow
def test_a_vanished_class_folder_is_named_on_resume(one_epoch, tiny_data, tmp_path):
    data = copy_of(tiny_data, tmp_path, "fewer")
    for split in ("train", "val"):
        shutil.rmtree(data / split / "class_1")
    save = copy_of(one_epoch, tmp_path, "run")
    result = run_bounded(step(STEP1, str(data), bare_teacher(tmp_path, 2), save, "--epochs", 2,
                              "--resume_with_changes"))
    line = single_error_line(result)
    assert "(2 classes here, 3 classes there): class 1 is 'class_1' there but 'class_2' here; 'class_1' has " \
           "no class folder here; restore the class folders it was trained on" in line


@pytest.mark.slow
def test_step2_refuses_a_step1_checkpoint_of_other_classes(one_epoch, tiny_data, teacher_weights, tmp_path):
    data = renamed(tiny_data, tmp_path, "class_0", "class_5")
    checkpoint = one_epoch / run_folder.BEST
    result = run_bounded(step(STEP2, data, teacher_weights, tmp_path / "step2", "--step1_checkpoint", checkpoint))
    line = single_error_line(result)
    assert f"are not the classes {checkpoint} was trained on, in label order: class 0 is 'class_0' there " \
           f"but 'class_1' here" in line and "--step1_checkpoint of a step-1 run on these classes" in line
    assert not (tmp_path / "step2" / run_folder.LAST).exists()


@pytest.mark.slow
def test_evaluate_refuses_renamed_class_folders(one_epoch, tiny_data, tmp_path):
    data = renamed(tiny_data, tmp_path, "class_1", "class_9")
    checkpoint = one_epoch / run_folder.BEST
    result = run_bounded([sys.executable, "evaluate.py", "--data", data, "--checkpoint", str(checkpoint),
                          "--device", "cpu", "-j", "0"])
    line = single_error_line(result)
    assert line.startswith(f"error: the class folders of {data}/val are not the classes {checkpoint} was "
                           f"trained on, in label order: class 1 is 'class_1' there but 'class_2' here")


@pytest.mark.slow
def test_a_checkpoint_without_classes_still_resumes_and_says_so(one_epoch, tiny_data, teacher_weights, tmp_path):
    save = copy_of(one_epoch, tmp_path, "run")
    state = torch.load(save / run_folder.LAST, weights_only=True)
    del state["classes"]  # as written before checkpoints recorded them
    torch.save(state, save / run_folder.LAST)
    result = succeeded(run_bounded(step(STEP1, tiny_data, teacher_weights, save, "--epochs", 2,
                                        "--resume_with_changes")))
    assert (f"=> {save}/{run_folder.LAST} records no class names (written before checkpoints kept them)"
            in result.stdout)
    assert torch.load(save / run_folder.LAST, weights_only=True)["classes"] == ["class_0", "class_1", "class_2"]


def labelled_folder(root, names):
    """``root/{train,val}/<name>/`` for each name, two small images each."""
    for split in ("train", "val"):
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (36, 36), (40 * k, 20 * i, 0)).save(folder / f"{i}.png")
    return str(root)


def test_a_teacher_trained_on_other_classes_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    data = labelled_folder(tmp_path / "data", ["checker", "hstripes", "plain"])
    teacher = tmp_path / "teacher.pth"  # as tools.train_teacher writes it
    torch.save({"state_dict": torchvision.models.resnet18(num_classes=3).state_dict(), "arch": "resnet18",
                "classes": ["hstripes", "plain", "zz_checker"]}, teacher)

    def train_step1(argv):
        sys.argv = ["step1/train.py", *argv]
        trainer.main(1)

    line = main_error_line(train_step1, train_args(data, teacher, tmp_path / "run"), capsys)
    assert line == (f"error: the class folders of {data}/train are not the classes the teacher {teacher} was "
                    f"trained on, in label order: class 0 is 'hstripes' there but 'checker' here; "
                    f"'zz_checker' has no class folder here; pass --teacher_weights of a teacher trained on "
                    f"this data (python -m tools.train_teacher), or the --data it was trained on")
    # The same classes in the same order, or a bare state_dict (no names to compare), are taken.
    build_teacher("resnet18", 3, str(teacher), classes=["hstripes", "plain", "zz_checker"])
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), teacher)
    build_teacher("resnet18", 3, str(teacher), classes=["checker", "hstripes", "plain"])


def released_model():
    """What evaluate.py reads from a released file: no class names, 1000 ImageNet outputs."""
    return types.SimpleNamespace(classes=None, spec=RunSpec())


def test_a_released_file_is_checked_against_imagenets_synset_order(capsys):
    synsets = list(ImageNetInfo().label_names())
    assert len(synsets) == 1000 and synsets[0] == "n01440764" and synsets == sorted(synsets)
    evaluate.check_classes(released_model(), synsets, "val", "released.pth")  # ImageNet's val/ tree
    other = sorted(synsets[:3] + ["n00000001"] + synsets[4:])  # one synset of another dataset
    with pytest.raises(UserError, match=r"are not the classes released.pth \(ImageNet's synsets, as it records "
                                        r"no classes\) was trained on, in label order: class 0 is 'n01440764' "
                                        r"there but 'n00000001' here; 'n01491361' has no class folder here"):
        evaluate.check_classes(released_model(), other, "val", "released.pth")
    # Folders that are not synset IDs cannot be checked: the run goes on, saying so.
    numbered = [f"{k:03d}" for k in range(1000)]
    evaluate.check_classes(released_model(), numbered, "val", "released.pth")
    assert "the class folders of val are not synset IDs (e.g. '000'), so their order is not checked" in \
        capsys.readouterr().out


@pytest.mark.slow
def test_evaluate_refuses_a_released_file_on_folders_of_other_synsets(tmp_path):
    state = {f"module.{k}": v for k, v in reactnet(1000, binary_weights=True).state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "released.pth.tar")  # the published layout
    synsets = list(ImageNetInfo().label_names())
    for name in ["n01440765"] + synsets[1:]:  # the first folder misnamed
        folder = tmp_path / "data" / "val" / name
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(folder / "0.png")
    result = run_bounded([sys.executable, "evaluate.py", "--data", str(tmp_path / "data"), "--checkpoint",
                          str(tmp_path / "released.pth.tar"), "--image_size", "32", "--device", "cpu", "-j", "0"])
    line = single_error_line(result)
    assert "(ImageNet's synsets, as it records no classes) was trained on, in label order: class 0 is " \
           "'n01440764' there but 'n01440765' here" in line
