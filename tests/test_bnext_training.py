"""Training BNext: AdamBNN's two steps like any architecture, with the binarizers' temperature as
training state (its schedule, resumed after a SIGKILL, recorded), and BNext's own one-step recipe
(AdamW with its two weight-decay groups, warm-up then cosine, the temperature schedule)."""
import json
import math
import os
import re
import signal
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, run_script, run_sh, run_tool, single_error_line, succeeded, train_args
from PIL import Image
from test_robustness import assert_bit_identical, adam_moments, checkpoint, interrupted, progress_lines

from test_bnext import bnext_spec

from models import RunSpec, build_model
from utils.errors import UserError
from utils.optim import build_optimizer, build_scheduler
from utils.recipe import get_recipe
from utils.training_flags import build_parser, fill_defaults

STEP1, STEP2 = os.path.join(REPO, "step1", "train.py"), os.path.join(REPO, "step2", "train.py")


# --- The recipes' defaults ---

def filled(step, *flags):
    """The training flags as the trainer fills them in, from the recipe named (else the default)."""
    args = build_parser(step).parse_args(["--data", "d", *flags])
    return vars(fill_defaults(args, get_recipe(args.recipe or RunSpec.recipe, step), step))


RECIPE_FLAGS = ("batch_size", "epochs", "optimizer", "learning_rate", "weight_decay")


def test_adambnn_defaults_are_the_published_ones():
    assert [filled(1)[k] for k in RECIPE_FLAGS] == [256, 256, "adam", 1.25e-3, 5e-6]
    assert [filled(2)[k] for k in RECIPE_FLAGS] == [256, 256, "adam", 1.25e-3, 0.0]
    assert [filled(2, "--optimizer", "sgd")[k] for k in RECIPE_FLAGS] == [256, 256, "sgd", 0.1, 0.0]


def test_bnext_recipe_defaults_and_flags_over_them():
    assert [filled(2, "--recipe", "bnext")[k] for k in RECIPE_FLAGS] == [512, 512, "adamw", 1e-3, 1e-3]
    given = filled(2, "--recipe", "bnext", "--epochs", "7", "--weight_decay", "0.5", "--batch_size", "8")
    assert [given[k] for k in RECIPE_FLAGS] == [8, 7, "adamw", 1e-3, 0.5]


def test_bnext_recipe_in_step1_is_one_line(tiny_data):
    line = single_error_line(run_script("step1/train.py", "--data", tiny_data, "--recipe", "bnext"))
    assert line == ("error: --recipe bnext trains in one step, step 2, with binary weights from the start: "
                    "run it as RECIPE=bnext STEP1_CHECKPOINT=none bash step2/run.sh")


def test_an_optimizer_without_a_rate_in_the_recipe_is_refused():
    with pytest.raises(UserError, match="^the adambnn recipe has no learning rate for --optimizer adamw: "
                                        "pass --learning_rate$"):
        filled(2, "--optimizer", "adamw")
    assert filled(2, "--optimizer", "adamw", "--learning_rate", "0.01")["learning_rate"] == 0.01


def test_bnext_optimizer_is_adamw_with_its_two_weight_decay_groups():
    model = build_model(bnext_spec("bnext_tiny", 10, True))
    optimizer = build_optimizer(model, 1e-3, 1e-3, name="adamw", groups="bnext")
    assert type(optimizer) is torch.optim.AdamW
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-8, 1e-3]
    # The published rule: 4-D parameters or those named binary_conv decay by 1e-8.
    assert groups[0] == {n for n, p in model.named_parameters() if p.dim() == 4 or "binary_conv" in n}
    assert {"feature.0.conv1.weight", "feature.1.FFN_1.scale", "feature.1.FFN_1.move.bias",
            "feature.1.Attention.binary_conv.weight", "feature.2.Attention.se.se.1.weight"} <= groups[0]
    assert {"feature.0.bn1.weight", "feature.0.prelu.weight", "feature.2.Attention.se.se.1.bias",
            "feature.2.Attention.activation1.weight", "prelu.weight", "fc.weight", "fc.bias"} <= groups[1]
    assert groups[0] | groups[1] == set(names.values()) and not groups[0] & groups[1]


def test_bnext_decay_is_decoupled():
    # One AdamW step on a zero loss gradient: each parameter shrinks by lr * wd of its group.
    model = build_model(bnext_spec("bnext_tiny", 10, True))
    optimizer = build_optimizer(model, 1e-3, 1e-3, name="adamw", groups="bnext")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, decay in (("fc.weight", 1e-3), ("feature.1.Attention.binary_conv.weight", 1e-8)):
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(),
                                   before[name] * (1 - 1e-3 * decay), rtol=0, atol=0)


def timm_warmup_cosine(epoch, epochs, base):
    """timm's CosineLRScheduler(t_initial=epochs, warmup_t=5, warmup_lr_init=1e-5, lr_min=1e-7,
    warmup_prefix=True) at ``epoch``, as BNext steps it at the start of every epoch."""
    if epoch < 5:
        return 1e-5 + epoch * (base - 1e-5) / 5
    return 1e-7 + 0.5 * (base - 1e-7) * (1 + math.cos(math.pi * (epoch - 5) / epochs))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_bnext_schedule_is_timms_warmup_then_cosine():
    epochs, base = 20, 1e-3
    optimizer = build_optimizer(torch.nn.Linear(2, 2), base, 0.0, name="adamw", groups="bnext")
    scheduler = build_scheduler(optimizer, epochs, "warmup_cosine", base)
    rates = []
    for _ in range(epochs):  # stepped before each epoch, as the trainer does
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([timm_warmup_cosine(e, epochs, base) for e in range(epochs)], rel=1e-12)
    assert rates[0] == pytest.approx(1e-5) and rates[5] == pytest.approx(base) and rates[-1] > 1e-7


# --- BNext's recipe through step2/run.sh ---

@pytest.mark.slow
def test_bnext_recipe_through_step2_run_sh(tiny_data, teacher_weights, tmp_path):
    save = tmp_path / "bnext"
    env = {"RECIPE": "bnext", "ARCH": "bnext_tiny", "STEP1_CHECKPOINT": "none", "DATA": tiny_data,
           "BATCH_SIZE": "8", "EPOCHS": "2", "IMAGE_SIZE": "32", "TEACHER": "resnet18",
           "TEACHER_WEIGHTS": teacher_weights, "WORKERS": "0", "SAVE": str(save), "NGPUS": "1"}
    result = succeeded(run_sh(2, env, "--device", "cpu", "--no_metrics", cwd=str(tmp_path)))
    assert "=> step 2: BNext-T, 3 classes" in result.stdout
    state = checkpoint(save)
    args = state["args"]
    assert [args[k] for k in ("recipe", "arch", "step1_checkpoint", *RECIPE_FLAGS)] == \
        ["bnext", "bnext_tiny", "none", 8, 2, "adamw", 1e-3, 1e-3]
    groups = state["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [1e-8, 1e-3] and all(g["decoupled_weight_decay"] for g in groups)
    rates = [float(v) for v in re.findall(r"^learning_rate: (\S+)$", result.stdout, flags=re.M)]
    assert rates == pytest.approx([timm_warmup_cosine(e, 2, 1e-3) for e in range(2)], rel=1e-12)
    records = [json.loads(line) for line in open(save / "metrics.jsonl")]
    assert [r["temperature"] for r in records] == [1.0, pytest.approx(0.9)]
    assert state["state_dict"]["feature.1.Attention.binary_conv.temperature"].item() == pytest.approx(0.9)


# --- Done when: BNext-T through AdamBNN's two steps on digits-size data ---

# Ten classes, one colour each, with noise: what a teacher learns in seconds.
COLOURS = [(230, 40, 40), (40, 200, 40), (40, 40, 230), (230, 230, 40), (230, 40, 230), (40, 230, 230),
           (240, 240, 240), (20, 20, 20), (140, 90, 20), (120, 120, 120)]


def write_colour_classes(root, per_class, seed=0):
    """``root/{split}/class_k/*.png``: 36x36 images of colour k plus Gaussian noise (std 25)."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for k, colour in enumerate(COLOURS):
            folder = os.path.join(root, split, f"class_{k}")
            os.makedirs(folder)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (36, 36, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, f"{i}.png"))
    return str(root)


def float32_powers(base, count):
    """``[1, base, base**2, ...]`` as the float32 buffers compute them, one multiplication at a time."""
    values, t = [], torch.ones(1)
    for _ in range(count):
        values.append(t.item())
        t = t * base
    return values


@pytest.mark.slow
def test_bnext_tiny_trains_two_steps_resumes_after_sigkill_and_evaluates(tmp_path):
    data = write_colour_classes(tmp_path / "data", {"train": 4, "val": 2})
    teacher = str(tmp_path / "teacher.pth")
    succeeded(run_tool("train_teacher", "--data", data, "--arch", "resnet18", "--epochs", 10, "--batch_size", 8,
                       "--image_size", 32, "-j", 0, "--device", "cpu", "--out", teacher))

    # Step 1: 3 epochs of 5 iterations; epoch e trains at 1e-2 * (1 - (e + 1) / 3).
    def step1(save):
        return [STEP1, *map(str, train_args(data, teacher, save, "--arch", "bnext_tiny", "--learning_rate", 1e-2,
                                            "--save_every_iters", 2, "--print_freq", 1, "--no_metrics",
                                            epochs=3, batch_size=8))]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    first = succeeded(run_script(*step1(straight)))
    assert "=> step 1: BNext-T, 10 classes" in first.stdout
    uninterrupted = checkpoint(straight)
    temperatures = float32_powers(0.9, 3)

    # Killed in iteration 2 of epoch 1 (after its update, before the checkpoint of iteration 4).
    result = interrupted([sys.executable, *step1(killed)], "SIGKILL", after_step=8)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-2000:]
    saved = checkpoint(killed)
    assert (saved["epoch"], saved["iteration"]) == (1, 2)
    assert saved["state_dict"]["feature.5.FFN.binary_conv.temperature"].item() == temperatures[1]
    resumed = succeeded(run_script(*step1(killed)))
    assert re.search(r"^=> resuming \S+ at epoch 1 iteration 2 ", resumed.stdout, re.M)
    assert progress_lines(resumed.stdout)[0] == (1, 2)
    final = checkpoint(killed)
    assert_bit_identical(final["state_dict"], uninterrupted["state_dict"])
    assert_bit_identical(adam_moments(final), adam_moments(uninterrupted))
    model_temperatures = {v.item() for k, v in final["state_dict"].items() if k.endswith("temperature")}
    assert model_temperatures == {temperatures[2]}

    # The temperature each epoch ran at, in metrics.jsonl, TensorBoard and the epoch's line.
    for folder in (straight, killed):
        records = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
        assert [r["temperature"] for r in records] == temperatures
    log = open(os.path.join(killed, "log.txt")).read()
    assert re.findall(r"^=> epoch (\d) done in .*; temperature (\S+)$", log, re.M) == \
        [(str(e), f"{t:.6g}") for e, t in enumerate(temperatures)]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(straight, "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("epoch/temperature")] == pytest.approx(temperatures, rel=1e-7)

    # Step 2 from step 1's best, without naming the architecture (its weights now clamp(W / T), the
    # temperature going on from step 1's); then evaluate.py without --arch.
    step2 = str(tmp_path / "step2")
    second = succeeded(run_script(STEP2, *train_args(data, teacher, step2, "--step1_checkpoint",
                                                     os.path.join(straight, "model_best.pth.tar"),
                                                     "--learning_rate", 2e-3, "--no_metrics",
                                                     epochs=2, batch_size=8)))
    assert "=> step 2: BNext-T, 10 classes" in second.stdout
    best = os.path.join(step2, "model_best.pth.tar")
    evaluated = succeeded(run_script("evaluate.py", "--data", data, "--checkpoint", best, "-j", 0, "--device", "cpu"))
    assert "(BNext-T) as step 2" in evaluated.stdout and "bicubic" in evaluated.stdout
    top1 = float(re.findall(r"^ \* acc@1 (\S+) ", evaluated.stdout, re.M)[-1])
    # The model validated as saved (its temperature included), and well above chance (10%).
    assert top1 == pytest.approx(torch.load(best, weights_only=True)["best_top1_acc"], abs=5e-4)
    assert top1 >= 40
