"""The training recipe (Adam, the linear schedule stepped per epoch, the distillation loss) and exact resume."""
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from models import reactnet
from models.layers import GlobalMeanPool
from utils.distill import distillation_loss
from utils.optim import build_optimizer
from utils.runtime import configure_device
from utils.trainer import Trainer
from utils.training_flags import build_parser

from conftest import REPO, run_script, train_args

LR, WD = 1.25e-3, 5e-6
CHECKPOINT_KEYS = {"epoch", "iteration", "state_dict", "optimizer", "scheduler", "best_top1_acc",
                   "step", "num_classes", "args"}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return reactnet(num_classes=4)


def published_decayed_names(model):
    """The published code's decayed group: parameters with 4 dimensions or 'conv' in their name."""
    return {name for name, p in model.named_parameters() if len(p.shape) == 4 or "conv" in name}


def group_names(model, group):
    ids = {id(p) for p in group["params"]}
    return {name for name, p in model.named_parameters() if id(p) in ids}


# --- Optimizer ---

def test_optimizer_is_adam_with_published_betas(model):
    optimizer = build_optimizer(model, LR, WD)
    assert type(optimizer) is torch.optim.Adam
    assert len(optimizer.param_groups) == 2
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.999) and group["lr"] == LR
        assert not group.get("decoupled_weight_decay", False)


def test_weight_decay_follows_the_published_grouping(model):
    optimizer = build_optimizer(model, LR, WD)
    decayed = set().union(*(group_names(model, g) for g in optimizer.param_groups if g["weight_decay"] > 0))
    plain = set().union(*(group_names(model, g) for g in optimizer.param_groups if g["weight_decay"] == 0))
    assert all(g["weight_decay"] in (0, WD) for g in optimizer.param_groups)
    assert decayed == published_decayed_names(model)
    # Conv weights (stem; 13 binary_3x3; binary_pw of 8 blocks; binary_pw_down1/2 of the 5 widening
    # blocks) and the six learnable shifts move11..move23 of each of the 13 blocks.
    assert len(decayed) == (1 + 13 + 8 + 5 * 2) + 6 * 13
    assert {"feature.0.conv1.weight", "feature.1.binary_3x3.weight", "feature.1.move11.bias",
            "feature.13.move23.bias"} <= decayed
    assert plain == {name for name, _ in model.named_parameters()} - decayed
    assert {"feature.0.bn1.weight", "feature.1.prelu1.weight", "feature.2.bn2_1.bias",
            "fc.weight", "fc.bias"} <= plain


def test_weight_decay_is_l2_added_to_the_gradient():
    # One Adam step on a zero loss gradient: L2 makes the gradient wd * w, so the first step
    # moves w by lr * g / (|g| + eps); AdamW would move it by lr * wd * w instead.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3))
    optimizer = build_optimizer(net, LR, WD)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    g = WD * before[0]
    torch.testing.assert_close(net[0].weight.detach(), before[0] - LR * g / (g.abs() + 1e-8))
    for p, old in zip(list(net.parameters())[1:], before[1:]):
        assert torch.equal(p.detach(), old)


# --- Distillation loss ---

def soft_cross_entropy_by_hand(student, teacher):
    """mean_b -sum_c p_t log p_s, element by element in float64."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        t_max, s_max = max(t_row), max(s_row)
        t_exp = [math.exp(v - t_max) for v in t_row]
        p_t = [e / sum(t_exp) for e in t_exp]
        log_z = s_max + math.log(sum(math.exp(v - s_max) for v in s_row))
        total += -sum(p * (v - log_z) for p, v in zip(p_t, s_row))
    return total / len(student)


def logits_pair(batch=5, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g) * 3, torch.randn(batch, classes, generator=g) * 3




MMAPPED_BYTES_OF_LARGE_BLOCKS = textwrap.dedent("""
    import ctypes, sys, torch
    from utils.runtime import keep_freed_host_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        assert keep_freed_host_memory()
    blocks = [torch.ones(16 * 2**20) for _ in range(3)]  # 64 MB each, alive together
    print(mallinfo2().hblkhd)  # bytes in blocks mapped on their own, returned to the system when freed
""")


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_cpu_training_keeps_large_blocks_in_the_reusable_heap():
    # Whether the kernel then page-faults a reused heap block is its own business (it varies with
    # the machine's memory pressure); what the setting controls is where glibc puts the blocks.
    def mmapped_bytes(mode):
        result = subprocess.run([sys.executable, "-c", MMAPPED_BYTES_OF_LARGE_BLOCKS, mode], cwd=REPO,
                                capture_output=True, text=True, check=True)
        return int(result.stdout)
    block = 64 * 2**20
    # glibc's defaults map every block of this size on its own and unmap it when it is freed.
    assert mmapped_bytes("default") >= 3 * block
    assert mmapped_bytes("keep") < block


def test_distillation_loss_is_soft_cross_entropy():
    student, teacher = logits_pair()
    loss = distillation_loss(student, teacher)
    assert loss.item() == pytest.approx(soft_cross_entropy_by_hand(student, teacher), rel=1e-6)


def test_distillation_loss_is_not_hard_label_cross_entropy():
    student, teacher = logits_pair(seed=1)
    hard = nn.functional.cross_entropy(student, teacher.argmax(1))
    assert distillation_loss(student, teacher).item() != pytest.approx(hard.item(), rel=1e-3)


def test_distillation_gradient_wrt_student_logits():
    student, teacher = logits_pair(seed=2)
    student.requires_grad_(True)
    distillation_loss(student, teacher).backward()
    expected = (torch.softmax(student.detach(), 1) - torch.softmax(teacher, 1)) / len(student)
    torch.testing.assert_close(student.grad, expected)


def test_distillation_refuses_teacher_logits_that_require_grad():
    student, teacher = logits_pair(seed=3)
    with pytest.raises(ValueError):
        distillation_loss(student, teacher.requires_grad_(True))


# --- Resume ---

# Runs step1/train.py inside the wrapper's own process and ends it right after the first
# checkpoint is written, as a crash or a preemption would at an epoch boundary.
CRASH_AFTER_FIRST_SAVE = textwrap.dedent("""
    import os, runpy, sys
    repo = sys.argv.pop(1)
    sys.path.insert(0, repo)
    import utils.run_folder
    save = utils.run_folder.save
    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        os._exit(75)
    utils.run_folder.save = save_then_die
    sys.argv[0] = os.path.join(repo, "step1", "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def trainer_state(trainer):
    return {"state_dict": trainer.student.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "epoch": trainer.epoch,
            "iteration": trainer.iteration, "best_top1_acc": trainer.best_top1,
            "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def assert_same(a, b, where="checkpoint"):
    """Equal down to the bit, through nested dicts, lists and tuples of tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def val_accuracies(log):
    return [float(v) for v in re.findall(r"^ \* acc@1 (\S+) acc@5", log, flags=re.M)]


EPOCHS = 3  # epoch e trains at LR * (1 - (e + 1) / 3): 2/3, 1/3 and 0 of LR


@pytest.fixture(scope="module")
def runs(tiny_data, teacher_weights, tmp_path_factory):
    """A 3-epoch run that dies after epoch 0 and is resumed, and the same run uninterrupted."""
    root = tmp_path_factory.mktemp("resume")
    wrapper = root / "crash_after_first_save.py"
    wrapper.write_text(CRASH_AFTER_FIRST_SAVE)
    interrupted, uninterrupted = str(root / "interrupted"), str(root / "uninterrupted")

    crashed = run_script(str(wrapper), REPO, *train_args(tiny_data, teacher_weights, interrupted, epochs=EPOCHS))
    saved = load(os.path.join(interrupted, "checkpoint.pth.tar"))

    # What a resuming run holds once set up, captured in this process from a copy of the folder.
    copy = root / "restored"
    copy.mkdir()
    shutil.copy(os.path.join(interrupted, "checkpoint.pth.tar"), copy)
    flags = [str(a) for a in train_args(tiny_data, teacher_weights, str(copy), epochs=EPOCHS)]
    restored = trainer_state(Trainer(build_parser(1).parse_args(flags), 1))

    resumed = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, interrupted,
                                                         epochs=EPOCHS))
    straight = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, uninterrupted,
                                                          epochs=EPOCHS))
    return {"crashed": crashed, "saved": saved, "restored": restored, "resumed": resumed,
            "straight": straight, "interrupted": interrupted, "uninterrupted": uninterrupted}


@pytest.mark.slow
def test_interrupted_run_stopped_after_its_first_checkpoint(runs):
    assert runs["crashed"].returncode == 75, runs["crashed"].stderr[-2000:]
    assert runs["saved"]["epoch"] == 1 and runs["saved"]["iteration"] == 0


@pytest.mark.slow
def test_rerun_resumes_at_epoch_1(runs):
    assert runs["resumed"].returncode == 0, runs["resumed"].stderr[-2000:]
    assert re.search(r"resuming .* at epoch 1\b", runs["resumed"].stdout)
    with open(os.path.join(runs["interrupted"], "log.txt")) as f:
        assert re.search(r"^=> resuming .* at epoch 1\b", f.read(), flags=re.M)
    assert "Epoch: [0]" not in runs["resumed"].stdout and "Epoch: [1]" in runs["resumed"].stdout


@pytest.mark.slow
def test_resume_restores_model_optimizer_scheduler_and_position(runs):
    saved, restored = runs["saved"], runs["restored"]
    assert saved["optimizer"]["state"], "Adam has no moments to compare"
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(saved["optimizer"]["state"][0])
    for key in ("state_dict", "optimizer", "scheduler", "epoch", "iteration", "best_top1_acc"):
        assert_same(restored[key], saved[key], key)


@pytest.mark.slow
def test_resume_restores_python_and_numpy_rng(runs):
    saved, restored = runs["saved"]["rng"], runs["restored"]
    kind, keys, pos, has_gauss, cached = restored["numpy"]
    assert kind == saved["numpy"]["kind"] and pos == saved["numpy"]["pos"]
    assert np.array_equal(keys, saved["numpy"]["keys"].numpy().astype(np.uint32))
    assert restored["python"][1] == tuple(saved["python"][1])


@pytest.mark.slow
def test_resume_restores_torch_rng(runs):
    assert torch.equal(runs["restored"]["torch"], runs["saved"]["rng"]["torch"])


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(runs):
    assert runs["straight"].returncode == 0, runs["straight"].stderr[-2000:]
    resumed = load(os.path.join(runs["interrupted"], "checkpoint.pth.tar"))
    straight = load(os.path.join(runs["uninterrupted"], "checkpoint.pth.tar"))
    # Epoch 1 trains at a non-zero rate after the resume: losing anything would change the weights.
    assert not torch.equal(runs["saved"]["state_dict"]["fc.weight"], straight["state_dict"]["fc.weight"])
    for key in ("state_dict", "optimizer", "scheduler", "epoch", "best_top1_acc"):
        assert_same(resumed[key], straight[key], key)


@pytest.mark.slow
def test_resumed_run_ends_with_the_uninterrupted_torch_rng_state(runs):
    resumed = load(os.path.join(runs["interrupted"], "checkpoint.pth.tar"))
    straight = load(os.path.join(runs["uninterrupted"], "checkpoint.pth.tar"))
    assert torch.equal(resumed["rng"]["torch"], straight["rng"]["torch"])


# --- The learning rate of each epoch, as the training command uses it ---

def logged_learning_rates(output):
    return [float(v) for v in re.findall(r"^learning_rate: (\S+)$", output, flags=re.M)]


def metrics_records(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_each_epoch_trains_at_the_linearly_decayed_rate(runs):
    # The schedule is stepped at the start of every epoch, as in the published code.
    expected = [LR * (1 - (e + 1) / EPOCHS) for e in range(EPOCHS)]
    assert logged_learning_rates(runs["straight"].stdout) == pytest.approx(expected, abs=1e-15)
    records = metrics_records(runs["uninterrupted"])
    assert [r["epoch"] for r in records] == list(range(EPOCHS))
    assert [r["lr"] for r in records] == pytest.approx(expected, abs=1e-15)
    # The resumed run goes on with the schedule instead of starting it again.
    assert logged_learning_rates(runs["crashed"].stdout) == pytest.approx(expected[:1], abs=1e-15)
    assert logged_learning_rates(runs["resumed"].stdout) == pytest.approx(expected[1:], abs=1e-15)
    # Both parameter groups (with and without weight decay) follow it.
    after_epoch_0 = [g["lr"] for g in runs["saved"]["optimizer"]["param_groups"]]
    final = load(os.path.join(runs["uninterrupted"], "checkpoint.pth.tar"))
    assert after_epoch_0 == pytest.approx([expected[0]] * 2, abs=1e-15)
    assert [g["lr"] for g in final["optimizer"]["param_groups"]] == [0.0, 0.0]


@pytest.mark.slow
def test_the_rate_is_what_moves_the_weights(runs):
    # Weights flip sign while the rate is positive and stay put at rate 0, in the last epoch.
    flip_flops = [r["flip_flop"] for r in metrics_records(runs["uninterrupted"])]
    assert flip_flops[0] > 0 and flip_flops[1] > 0 and flip_flops[2] == 0


# --- What a run folder holds ---

@pytest.mark.slow
def test_checkpoint_content(runs):
    checkpoint = load(os.path.join(runs["uninterrupted"], "checkpoint.pth.tar"))
    assert CHECKPOINT_KEYS <= set(checkpoint)
    assert checkpoint["epoch"] == EPOCHS and checkpoint["iteration"] == 0
    assert checkpoint["step"] == 1 and checkpoint["num_classes"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["state_dict"])
    assert list(checkpoint["state_dict"]) == list(reactnet(3).state_dict())
    assert type(checkpoint["args"]) is dict
    assert checkpoint["args"]["epochs"] == EPOCHS and checkpoint["args"]["weight_decay"] == WD


@pytest.mark.slow
def test_best_accuracy_is_the_best_validation_line(runs):
    with open(os.path.join(runs["uninterrupted"], "log.txt")) as f:
        accuracies = val_accuracies(f.read())
    assert len(accuracies) == EPOCHS
    checkpoint = load(os.path.join(runs["uninterrupted"], "checkpoint.pth.tar"))
    assert checkpoint["best_top1_acc"] == pytest.approx(max(accuracies), abs=5e-4)


@pytest.mark.slow
def test_run_folder_holds_args_json_and_best_model(runs):
    folder = runs["uninterrupted"]
    with open(os.path.join(folder, "args.json")) as f:
        args = json.load(f)
    assert args == load(os.path.join(folder, "checkpoint.pth.tar"))["args"]
    assert args["batch_size"] == 8 and args["image_size"] == 32
    best = load(os.path.join(folder, "model_best.pth.tar"))
    assert set(best["state_dict"]) == set(reactnet(3).state_dict())


# --- Determinism on GPUs ---

@pytest.mark.parametrize("preset, expected", [(None, ":4096:8"), (":16:8", ":16:8")])
def test_deterministic_settings_and_pooling(monkeypatch, preset, expected):
    # A workspace setting the user already made is kept; without one, the larger one is chosen.
    # Set first, so that monkeypatch restores the variable as it was, also when it was unset.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset or "")
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    configure_device(torch.device("cuda"), deterministic=True)  # only flags: no GPU is touched
    try:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == expected
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64, requires_grad=True)
    mean = GlobalMeanPool()(x)
    torch.testing.assert_close(mean, nn.AdaptiveAvgPool2d(1)(x))
    mean.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 / 21))
