"""A model in one file: tests/toy_model.py (an architecture with its own defaults, and a binarizer)
works as a ``BNN_PLUGINS`` plugin and, copied into models/ of a fresh clone, as a built-in, through
every command line; the binarizer a run records is the one that ran."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import (REPO, evaluate_args, last_val_line, run_script, run_tool, single_error_line,
                      succeeded, train_args)

from models import RunSpec, build_model
from models.checkpoint import model_from_checkpoint
from models.spec import resolve
from utils.trainer import Trainer
from utils.training_flags import build_parser

TOY_MODEL = os.path.join(REPO, "tests", "toy_model.py")
COUNTING_BINARIZERS = os.path.join(REPO, "tests", "counting_binarizers.py")
PLUGIN = {"BNN_PLUGINS": TOY_MODEL}


def logged_val_line(folder):
    with open(os.path.join(folder, "log.txt")) as f:
        return last_val_line(f.read())


def summary_totals(stdout):
    return {line.split(":")[0]: line.split()[1] for line in stdout.splitlines()[-5:]}


# OPs of ToyNet at 32 px: the binary conv reads 8x16x16 and writes 16x8x8 (3x3 kernel); the stem
# (3 -> 8 channels at 16x16) and fc are real.
TOY_BOPS = f"{16 * 8 * 8 * 8 * 9:,}"
TOY_FLOPS = f"{8 * 16 * 16 * 3 * 9 + 16 * 3:,}"


@pytest.mark.slow
def test_toy_architecture_and_binarizer_through_every_command(tiny_data, teacher_weights, tmp_path, monkeypatch):
    step1, step2 = str(tmp_path / "step1"), str(tmp_path / "step2")
    # Step 1 for 2 epochs (epoch 0 trains at lr / 2) with the architecture's own binarizer and
    # evaluation transform, then resumed for a third without naming the model again.
    succeeded(run_script("step1/train.py", *train_args(tiny_data, teacher_weights, step1, "--arch", "toy_net",
                                                      epochs=2), env=PLUGIN))
    resumed = succeeded(run_script("step1/train.py", *train_args(tiny_data, teacher_weights, step1,
                                                                 "--resume_with_changes", epochs=3), env=PLUGIN))
    assert "=> resuming" in resumed.stdout and "=> step 1: ToyNet, 3 classes" in resumed.stdout
    saved = torch.load(os.path.join(step1, "checkpoint.pth.tar"), weights_only=True)
    assert saved["epoch"] == 3
    assert {k: saved[k] for k in ("arch", "act_binarizer", "interpolation", "crop_pct", "image_size")} == \
        {"arch": "toy_net", "act_binarizer": "toy_heaviside", "interpolation": "bicubic", "crop_pct": 0.9,
         "image_size": 32}

    # Step 2 from step 1, again without naming the model; its weights binarized by the toy too.
    succeeded(run_script("step2/train.py", *train_args(tiny_data, teacher_weights, step2, "--weight_binarizer",
                                                      "toy_heaviside", "--step1_checkpoint",
                                                      os.path.join(step1, "model_best.pth.tar"), epochs=2),
                         env=PLUGIN))
    best = os.path.join(step2, "model_best.pth.tar")
    monkeypatch.setenv("BNN_PLUGINS", TOY_MODEL)
    model, overrides = model_from_checkpoint(best)
    monkeypatch.delenv("BNN_PLUGINS")
    assert overrides == {}
    assert model.spec == RunSpec(arch="toy_net", act_binarizer="toy_heaviside", weight_binarizer="toy_heaviside",
                                 image_size=32, crop_pct=0.9, interpolation="bicubic", num_classes=3, step=2)
    toy_heaviside = sys.modules["toy_model"].toy_heaviside
    assert model.binary_activation.binarizer is toy_heaviside and model.binary_conv.weight_binarizer is toy_heaviside

    # evaluate.py with no flag but the data and the file: the validation training printed.
    evaluated = succeeded(run_script("evaluate.py", *evaluate_args(tiny_data, best), env=PLUGIN))
    assert "(ToyNet) as step 2" in evaluated.stdout and "at 32 px" in evaluated.stdout
    assert last_val_line(evaluated.stdout) == logged_val_line(step2)

    summary = succeeded(run_tool("summary", "--checkpoint", best, env=PLUGIN))
    assert summary.stdout.startswith("ToyNet, step 2 (binary weights), 3 classes, 32x32 input\n")
    totals = summary_totals(summary.stdout)
    assert (totals["BOPs"], totals["FLOPs"]) == (TOY_BOPS, TOY_FLOPS)

    # Without the plugin the names cannot be resolved, and the command says how to fix it.
    line = single_error_line(run_script("evaluate.py", *evaluate_args(tiny_data, best)))
    assert "unknown architecture 'toy_net'" in line and "BNN_PLUGINS" in line


def test_plugins_are_separated_by_the_path_separator():
    lookup = ("from models.registry import get_architecture, get_act_binarizer; "
              "print(get_architecture('toy_net').title, get_act_binarizer('counted').__name__)")
    result = subprocess.run([sys.executable, "-c", lookup], capture_output=True, text=True, cwd=REPO,
                            env=dict(os.environ, BNN_PLUGINS=os.pathsep.join([TOY_MODEL, COUNTING_BINARIZERS])))
    assert succeeded(result).stdout == "ToyNet counted_activation\n"


@pytest.mark.slow
def test_the_binarizers_a_run_records_are_the_ones_that_trained(tiny_data, teacher_weights, tmp_path):
    env = {"BNN_PLUGINS": os.pathsep.join([TOY_MODEL, COUNTING_BINARIZERS])}

    def counted_run(step, save, *flags):
        counts = tmp_path / f"counts{step}.json"
        succeeded(run_script(f"step{step}/train.py", *train_args(tiny_data, teacher_weights, save, *flags,
                                                                 epochs=2),
                             env=dict(env, BINARIZER_COUNTS=str(counts))))
        return json.loads(counts.read_text())

    # 24 training images in batches of 8 and 12 validation images: per epoch 3 training steps and
    # 2 validation batches, each one forward pass through ToyNet's single binary activation and conv.
    step1 = str(tmp_path / "step1")
    counts = counted_run(1, step1, "--arch", "toy_net", "--act_binarizer", "counted")
    assert counts == {"act": {"train": 6, "eval": 4}, "weight": {"train": 0, "eval": 0}}  # step 1: real weights
    counts = counted_run(2, str(tmp_path / "step2"), "--weight_binarizer", "counted",
                         "--step1_checkpoint", os.path.join(step1, "model_best.pth.tar"))
    assert counts == {"act": {"train": 6, "eval": 4}, "weight": {"train": 6, "eval": 4}}


def test_step2_checks_the_image_size_against_its_own_architecture(tiny_data, teacher_weights, tmp_path,
                                                                  monkeypatch):
    """ToyNet downsamples by 4: 16 px is enough for it, though not for the default ReActNet-A."""
    monkeypatch.setenv("BNN_PLUGINS", TOY_MODEL)
    spec, _ = resolve({"arch": "toy_net", "image_size": 16, "num_classes": 3, "step": 1})  # its own defaults
    step1 = tmp_path / "step1.pth.tar"
    torch.save({"state_dict": build_model(spec).state_dict(), **spec.as_dict()}, step1)
    flags = train_args(tiny_data, teacher_weights, tmp_path / "run", "--image_size", 16, "--step1_checkpoint", step1,
                       "--interpolation", "bilinear")
    args = build_parser(2).parse_args(list(map(str, flags)))
    trainer = Trainer(args, 2)
    assert (trainer.spec.arch, trainer.spec.image_size, trainer.spec.step) == ("toy_net", 16, 2)
    # What step 1 recorded is kept unless a flag says otherwise, and then the flag says so.
    assert (trainer.spec.act_binarizer, trainer.spec.crop_pct, trainer.spec.interpolation) == \
        ("toy_heaviside", 0.9, "bilinear")
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "=> --interpolation bilinear overrides the checkpoint's bicubic\n" in log and "--image_size" not in log


@pytest.mark.slow
def test_a_file_copied_into_models_of_a_fresh_clone_is_a_model(tiny_data, teacher_weights, tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", REPO, str(clone)], check=True)
    shutil.copy(TOY_MODEL, clone / "models" / "toy_model.py")
    # Nothing else is edited, and no plugin is named; the clone's own code runs from its root.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("BNN_PLUGINS", None)

    def run(*command, extra_env=None):
        return succeeded(subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True,
                                        cwd=clone, env=dict(env, **(extra_env or {})), timeout=600))

    step1, step2 = tmp_path / "step1", tmp_path / "step2"
    # The same file named in BNN_PLUGINS too: it is the module found in models/, not imported twice.
    run("step1/train.py", *train_args(tiny_data, teacher_weights, step1, "--arch", "toy_net", epochs=2),
        extra_env={"BNN_PLUGINS": str(clone / "models" / "toy_model.py")})
    run("step2/train.py", *train_args(tiny_data, teacher_weights, step2, "--step1_checkpoint",
                                      step1 / "model_best.pth.tar", epochs=2))
    evaluated = run("evaluate.py", *evaluate_args(tiny_data, step2 / "model_best.pth.tar"))
    assert "(ToyNet) as step 2" in evaluated.stdout
    assert last_val_line(evaluated.stdout) == logged_val_line(step2)
    summary = run("-m", "tools.summary", "--checkpoint", step2 / "model_best.pth.tar")
    assert summary.stdout.startswith("ToyNet, step 2 (binary weights), 3 classes, 32x32 input\n")
    assert summary_totals(summary.stdout)["BOPs"] == TOY_BOPS
