"""Resuming a run folder with other experiment flags: refused by default, applied on request."""
import shutil

import pytest
import torch

from conftest import run_script, single_error_line, train_args

LR = 1.25e-3  # the recipe's, which train_args leaves in place


@pytest.fixture(scope="module")
def one_epoch(tiny_data, teacher_weights, tmp_path_factory):
    save = tmp_path_factory.mktemp("one_epoch") / "run"
    result = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, save, epochs=1))
    assert result.returncode == 0, result.stderr[-3000:]
    return save


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


def test_another_optimizer_cannot_continue_even_on_request(one_epoch, tiny_data, teacher_weights):
    args = train_args(tiny_data, teacher_weights, one_epoch, "--optimizer", "sgd", "--resume_with_changes")
    line = single_error_line(run_script("step1/train.py", *args))
    assert "--optimizer adam" in line and "new --save" in line


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_scheduler_and_resume_with_changes_share_one_schedule_function(tiny_data, teacher_weights, tmp_path,
                                                                        monkeypatch):
    # Another schedule written in the one place: the scheduler and a resume that changes --epochs
    # must both follow it.
    import utils.optim
    from utils.trainer import Trainer
    from utils.training_flags import build_parser, fill_defaults
    monkeypatch.setattr(utils.optim, "learning_rate_factor", lambda steps, epochs: 0.5 ** steps / epochs)
    flags = [str(a) for a in train_args(tiny_data, teacher_weights, str(tmp_path / "run"), epochs=4)]
    trainer = Trainer(fill_defaults(build_parser(1).parse_args(flags)), 1)
    trainer.scheduler.step()
    trainer.scheduler.step()
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(LR * 0.25 / 4)
    trainer.args.epochs = 8
    trainer.apply_changes({"epochs": (4, 8)})
    assert [g["lr"] for g in trainer.optimizer.param_groups] == pytest.approx([LR * 0.25 / 8] * 2)
