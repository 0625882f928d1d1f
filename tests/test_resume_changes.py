"""Resuming a run folder with other flags: experiment flags refused by default and applied on
request, speed flags applied; every change recorded."""
import os
import shutil
import signal

import pytest
import torch

from conftest import NUM_CLASSES, REPO, run_script, single_error_line, train_args
from models import reactnet
from utils import optim, run_folder
from utils.errors import UserError
from utils.trainer import Trainer
from utils.training_flags import build_parser

LR = 1.25e-3  # the recipe's, which train_args leaves in place


@pytest.fixture(scope="module")
def one_epoch(tiny_data, teacher_weights, tmp_path_factory):
    save = tmp_path_factory.mktemp("one_epoch") / "run"
    result = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, save, epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    return save


@pytest.mark.slow
def test_changed_flags_are_refused_and_the_checkpoint_is_kept(one_epoch, tiny_data, teacher_weights):
    before = (one_epoch / "checkpoint.pth.tar").read_bytes()
    args = train_args(tiny_data, teacher_weights, one_epoch, "--learning_rate", 0.002,
                      "--seed", 5, epochs=3)
    line = single_error_line(run_script("step1/train.py", *args))
    for change in (f"--learning_rate {LR} -> 0.002", "--epochs 1 -> 3", "--seed 0 -> 5"):
        assert change in line, line
    assert "--weight_decay" not in line and "--workers" not in line
    assert "new --save" in line and "--resume_with_changes" in line
    assert (one_epoch / "checkpoint.pth.tar").read_bytes() == before


@pytest.mark.slow
def test_resume_with_changes_applies_the_new_schedule(one_epoch, tiny_data, teacher_weights, tmp_path):
    save = tmp_path / "run"
    shutil.copytree(one_epoch, save)
    args = train_args(tiny_data, teacher_weights, save, "--learning_rate", 0.002, "--weight_decay", 1e-3,
                      "--resume_with_changes", epochs=3)
    result = run_script("step1/train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing with changed flags" in result.stdout
    rates = [float(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("learning_rate:")]
    # Epochs 1 and 2 of 3 at the new base rate, as if the run had always had it.
    assert rates == pytest.approx([0.002 * (1 - 2 / 3), 0.0], abs=1e-12)
    state = torch.load(save / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 3 and state["args"]["learning_rate"] == 0.002
    assert state["optimizer"]["param_groups"][1]["weight_decay"] == 1e-3
    assert state["flag_changes"] == [{"epoch": 1, "iteration": 0, "changes": {
        "learning_rate": [LR, 0.002], "weight_decay": [5e-6, 1e-3], "epochs": [1, 3]}}]
    assert "continuing with changed flags" in (save / "log.txt").read_text()


@pytest.mark.slow
def test_another_optimizer_cannot_continue_even_on_request(one_epoch, tiny_data, teacher_weights):
    args = train_args(tiny_data, teacher_weights, one_epoch, "--optimizer", "sgd", "--resume_with_changes")
    line = single_error_line(run_script("step1/train.py", *args))
    assert "--optimizer adam" in line and "new --save" in line


# --- Each flag that a resume may change: refused, or recorded with the position it took effect ---

INTERRUPTED_RUN = os.path.join(REPO, "tests", "interrupted_run.py")


@pytest.fixture(scope="module")
def stopped(tiny_data, teacher_weights, tmp_path_factory):
    """A 2-epoch run (3 iterations each) sent SIGTERM after its first optimizer step: it finishes
    the iteration in progress and stops with a checkpoint at epoch 0 iteration 2."""
    save = tmp_path_factory.mktemp("stopped") / "run"
    env = {"INTERRUPT_SIGNAL": "SIGTERM", "INTERRUPT_AFTER_STEP": "1"}
    result = run_script(INTERRUPTED_RUN, os.path.join(REPO, "step1", "train.py"),
                        *train_args(tiny_data, teacher_weights, save, epochs=2), env=env)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    state = torch.load(save / run_folder.LAST, weights_only=True)
    assert (state["epoch"], state["iteration"]) == (0, 2)
    return save


def linked_copy(folder, target):
    """A new run folder holding ``folder``'s checkpoint as a hard link: resuming only reads it, and
    a save replaces the link instead of writing into it."""
    target.mkdir()
    os.link(folder / run_folder.LAST, target / run_folder.LAST)
    return target


def resumed(data, teacher, save, *extra, step=1, epochs=2):
    """The Trainer a run with these flags builds in ``save``, in this process (nothing trains)."""
    flags = [str(a) for a in train_args(data, teacher, save, *extra, epochs=epochs)]
    return Trainer(build_parser(step).parse_args(flags), step)


def refusal(data, teacher, save, *extra, step=1, epochs=2):
    with pytest.raises(UserError) as error:
        resumed(data, teacher, save, *extra, step=step, epochs=epochs)
    message = str(error.value)
    assert "\n" not in message
    return message


SPEED_CHANGES = {"amp": ["none", "bf16"], "fused_optimizer": [False, True],
                 "channels_last": [False, True], "deterministic": [False, True]}


@pytest.mark.slow
def test_speed_flags_may_change_and_are_recorded_to_the_final_checkpoint(stopped, tiny_data,
                                                                          teacher_weights, tmp_path):
    save = linked_copy(stopped, tmp_path / "run")
    args = train_args(tiny_data, teacher_weights, save, "--amp", "bf16", "--fused_optimizer",
                      "--channels_last", "--deterministic", epochs=2)
    result = run_script("step1/train.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing with changed flags: --amp none -> bf16" in result.stdout
    state = torch.load(save / run_folder.LAST, weights_only=True)
    assert state["epoch"] == 2
    assert state["flag_changes"] == [{"epoch": 0, "iteration": 2, "changes": SPEED_CHANGES}]
    assert {flag: state["args"][flag] for flag in SPEED_CHANGES} == {
        flag: new for flag, (_, new) in SPEED_CHANGES.items()}
    # The fused kernel is the one that ran, not the one the checkpoint was saved with.
    assert all(group["fused"] for group in state["optimizer"]["param_groups"])


@pytest.mark.slow
def test_every_later_checkpoint_keeps_the_changes_of_earlier_resumes(stopped, tiny_data, teacher_weights,
                                                                     tmp_path):
    save = linked_copy(stopped, tmp_path / "run")
    resumed(tiny_data, teacher_weights, save, "--amp", "bf16").save()
    trainer = resumed(tiny_data, teacher_weights, save, "--amp", "bf16", "--channels_last")
    assert trainer.state_dict()["flag_changes"] == [
        {"epoch": 0, "iteration": 2, "changes": {"amp": ["none", "bf16"]}},
        {"epoch": 0, "iteration": 2, "changes": {"channels_last": [False, True]}}]


@pytest.mark.slow
@pytest.mark.parametrize("flags, change", [(["--compile", "eager"], {"compile": [None, "eager"]}),
                                           (["--amp", "fp16"], {"amp": ["none", "fp16"]})])
def test_compile_and_fp16_may_change_and_are_recorded(stopped, tiny_data, teacher_weights, tmp_path,
                                                      flags, change):
    # fp16's gradient scaler starts afresh: the checkpoint holds no state of one.
    trainer = resumed(tiny_data, teacher_weights, linked_copy(stopped, tmp_path / "run"), *flags)
    assert trainer.state_dict()["flag_changes"] == [{"epoch": 0, "iteration": 2, "changes": change}]


@pytest.mark.slow
def test_another_data_backend_is_refused_unless_asked_for(stopped, tiny_data, teacher_weights, tmp_path):
    save = linked_copy(stopped, tmp_path / "run")
    line = refusal(tiny_data, teacher_weights, save, "--data_backend", "gpu")
    assert "--data_backend pil -> gpu" in line and "--resume_with_changes" in line
    trainer = resumed(tiny_data, teacher_weights, save, "--data_backend", "gpu", "--jpeg_decoder", "torchvision",
                      "--resume_with_changes")
    # The device's decoder, which the pil backend does not have, is recorded as a speed flag.
    assert trainer.flag_changes == [{"epoch": 0, "iteration": 2, "changes": {
        "data_backend": ["pil", "gpu"], "jpeg_decoder": [None, "torchvision"]}}]


@pytest.mark.slow
def test_the_same_data_folder_and_teacher_named_otherwise_are_no_change(stopped, tiny_data, teacher_weights,
                                                                        tmp_path, monkeypatch):
    teacher_copy = tmp_path / "teacher_copy.pth"
    shutil.copyfile(teacher_weights, teacher_copy)
    monkeypatch.chdir(os.path.dirname(tiny_data))
    for k, (data, teacher) in enumerate([(tiny_data + "/", teacher_weights),
                                         (os.path.basename(tiny_data), teacher_copy)]):
        trainer = resumed(data, teacher, linked_copy(stopped, tmp_path / f"run{k}"))
        assert trainer.flag_changes == [] and trainer.iteration == 2


def other_weights(teacher_weights, path):
    """Writes teacher weights that differ from ``teacher_weights`` to ``path``."""
    torch.save({k: v + 1 for k, v in torch.load(teacher_weights, weights_only=True).items()}, path)
    return path


@pytest.mark.slow
def test_moved_data_and_teacher_weights_replaced_in_place_are_changes(stopped, tiny_data, teacher_weights,
                                                                      tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_data, moved)
    line = refusal(moved, teacher_weights, linked_copy(stopped, tmp_path / "run"))
    assert f"--data {os.path.realpath(tiny_data)} -> {os.path.realpath(moved)};" in line
    # The run's teacher file, overwritten at the same path with other weights.
    teacher = tmp_path / "teacher.pth"
    shutil.copyfile(teacher_weights, teacher)
    state = torch.load(stopped / run_folder.LAST, weights_only=True)
    state["args"]["teacher_weights"] = str(teacher)
    state["inputs"]["teacher_weights"]["path"] = os.path.realpath(teacher)
    save = tmp_path / "teacher_run"
    save.mkdir()
    torch.save(state, save / run_folder.LAST)
    other_weights(teacher_weights, teacher)
    line = refusal(tiny_data, teacher, save)
    assert f"--teacher_weights {os.path.realpath(teacher)} (sha256 " in line and "--data" not in line
    trainer = resumed(moved, teacher, save, "--resume_with_changes")
    assert set(trainer.flag_changes[0]["changes"]) == {"data", "teacher_weights"}


@pytest.mark.slow
def test_a_checkpoint_without_recorded_inputs_compares_its_paths_as_they_are_now(
        stopped, tiny_data, teacher_weights, tmp_path):
    state = torch.load(stopped / run_folder.LAST, weights_only=True)
    del state["inputs"]
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / run_folder.LAST)
    teacher_copy = tmp_path / "teacher_copy.pth"
    shutil.copyfile(teacher_weights, teacher_copy)
    assert resumed(tiny_data + "/", teacher_copy, linked_copy(old, tmp_path / "run")).flag_changes == []
    other = other_weights(teacher_weights, tmp_path / "other_teacher.pth")
    assert "--teacher_weights" in refusal(tiny_data, other, linked_copy(old, tmp_path / "run2"))


def test_step2_cannot_continue_from_other_step1_weights(tiny_data, teacher_weights, tmp_path):
    torch.manual_seed(0)
    step1 = tmp_path / "step1.pth"
    torch.save(reactnet(NUM_CLASSES).state_dict(), step1)
    base = tmp_path / "base"
    resumed(tiny_data, teacher_weights, base, "--step1_checkpoint", step1, step=2).save()
    step1_copy = tmp_path / "step1_copy.pth"
    shutil.copyfile(step1, step1_copy)
    trainer = resumed(tiny_data, teacher_weights, linked_copy(base, tmp_path / "same"),
                      "--step1_checkpoint", step1_copy, step=2)
    assert trainer.flag_changes == []
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(reactnet(NUM_CLASSES).state_dict(), other)
    for k, start in enumerate([other, "none"]):
        line = refusal(tiny_data, teacher_weights, linked_copy(base, tmp_path / f"run{k}"),
                       "--step1_checkpoint", start, "--resume_with_changes", step=2)
        assert f"was started from --step1_checkpoint {os.path.realpath(step1)} (sha256" in line
        assert "new --save" in line and "--resume_with_changes" not in line


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_scheduler_and_resume_with_changes_share_one_schedule_function(tiny_data, teacher_weights, tmp_path,
                                                                        monkeypatch):
    # Another schedule written in the one place: the scheduler and a resume that changes --epochs
    # must both follow it.
    monkeypatch.setattr(optim, "learning_rate_factor", lambda steps, epochs, *schedule: 0.5 ** steps / epochs)
    flags = [str(a) for a in train_args(tiny_data, teacher_weights, str(tmp_path / "run"), epochs=4)]
    trainer = Trainer(build_parser(1).parse_args(flags), 1)
    trainer.scheduler.step()
    trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.25 / 4)
    trainer.args.epochs = 8
    trainer.apply_changes({"epochs": (4, 8)})
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([LR * 0.25 / 8] * 2)
