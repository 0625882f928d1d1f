"""Every entry point ends as the trainer does: the faults that reached tracebacks, lost work or gave
advice that did not fit, each driven through each command it applies to, end in one ``error:`` line
that says what happened and the fix that applies (status 2), and nothing already made is lost."""
import errno
import os
import shutil
import sys

import pytest
import torch
import torchvision

import evaluate
from conftest import RUN_TARGET, STUCK_WORKER, main_error_line, run_bounded, train_args, write_image_folder
from models import reactnet
from tools import ablation, benchmark, export_lce, landscape, train_teacher
from utils import monitor, run_folder, trainer
from utils.errors import UserError

BEYOND = 2**63
BEYOND_LINE = f"error: --batch_size {BEYOND} is beyond the largest count taken (2**63 - 1): pass a smaller value"


@pytest.fixture
def restore_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def train_main(step):
    """Training's entry point, called in this process as main_error_line calls a tool's."""
    def main(argv):
        sys.argv = [f"step{step}/train.py", *argv]
        trainer.main(step)
    return main


@pytest.mark.parametrize("command", ["evaluate", "train_teacher", "landscape", "export_lce", "benchmark",
                                     "ablation"])
def test_a_batch_size_beyond_int64_is_one_error_line_in_every_command(command, tiny_data, tmp_path, capsys):
    paths = {"evaluate": ["--data", tiny_data, "--checkpoint", tmp_path / "any.pth"],
             "train_teacher": ["--data", tiny_data, "--out", tmp_path / "teacher.pth"],
             "landscape": ["--data", tiny_data, "--checkpoint", tmp_path / "any.pth", "--out", tmp_path / "out"],
             "export_lce": ["--data", tiny_data, "--checkpoint", tmp_path / "any.pth", "--out", tmp_path / "out"],
             "benchmark": [],
             "ablation": ["--data", tiny_data, "--out", tmp_path / "out"]}[command]
    main = {"evaluate": evaluate.main, "train_teacher": train_teacher.main, "landscape": landscape.main,
            "export_lce": export_lce.main, "benchmark": benchmark.main, "ablation": ablation.main}[command]
    assert main_error_line(main, [*paths, "--batch_size", BEYOND], capsys) == BEYOND_LINE
    assert not os.path.exists(tmp_path / "out")


def test_teacher_epochs_beyond_int64_are_one_error_line(tiny_data, tmp_path, capsys):
    line = main_error_line(train_teacher.main, ["--data", tiny_data, "--out", tmp_path / "t.pth", "--epochs", BEYOND],
                           capsys)
    assert line == f"error: --epochs {BEYOND} is beyond the largest count taken (2**63 - 1): pass a smaller value"


def teacher_args(data, out, *extra):
    return ["--data", data, "--out", out, "--arch", "resnet18", "--epochs", 1, "--image_size", 32, "-j", 0,
            "--device", "cpu", *extra]


def test_the_teacher_training_refuses_a_batch_of_one_image_in_one_line(tiny_data, tmp_path, capsys):
    # At 32 px resnet18's last feature map is 1x1: BatchNorm cannot normalise one image.
    line = main_error_line(train_teacher.main, teacher_args(tiny_data, tmp_path / "t.pth", "--batch_size", 1), capsys)
    assert line == ("error: the training batch 0 of epoch 0 has 1 readable image, which BatchNorm cannot "
                    "normalise where the feature map is 1x1: use --batch_size of at least 2, or larger images")
    assert not (tmp_path / "t.pth").exists()


def test_the_teacher_training_names_a_batch_left_with_one_readable_image(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", {"train": 2, "val": 2}, num_classes=2)
    for path in sorted((tmp_path / "data" / "train").rglob("*.png"))[:3]:
        path.write_bytes(b"not an image")
    line = main_error_line(train_teacher.main, teacher_args(data, tmp_path / "t.pth", "--batch_size", 4), capsys)
    assert line.startswith("error: the training batch 0 of epoch 0 has 1 readable image, which BatchNorm cannot "
                           "normalise where the feature map is 1x1: 3 of its images are unreadable (first ")


def fail_writes_under(folder):
    """A torch.save that fails as a full disk fails it for every path under ``folder`` (None: all)."""
    real_save = torch.save

    def save(obj, path, *args, **kwargs):
        if folder is None or str(path).startswith(str(folder)):
            with open(path, "wb") as f:
                f.write(b"the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *args, **kwargs)
    return save


@pytest.mark.parametrize("spare_space", [True, False])
def test_the_teachers_weights_survive_a_full_disk_or_it_says_nothing_was_written(tiny_data, tmp_path, capsys,
                                                                               monkeypatch, spare_space):
    out_dir, spare = tmp_path / "full", tmp_path / "spare"
    out_dir.mkdir()
    spare.mkdir()
    (out_dir / "teacher.pth").write_bytes(b"an older teacher")
    monkeypatch.setattr("tempfile.tempdir", str(spare))  # TMPDIR
    monkeypatch.setattr(torch, "save", fail_writes_under(out_dir if spare_space else None))
    line = main_error_line(train_teacher.main, teacher_args(tiny_data, out_dir / "teacher.pth", "--batch_size", 8),
                           capsys)
    # --out is as it was: no partial file, nothing beside it.
    assert (out_dir / "teacher.pth").read_bytes() == b"an older teacher"
    assert os.listdir(out_dir) == ["teacher.pth"]
    kept = sorted(spare.iterdir())
    if spare_space:
        assert len(kept) == 1
        assert line == (f"error: could not write --out {out_dir / 'teacher.pth'} (No space left on device); the "
                        f"trained weights are saved in {kept[0]} instead: move them there once it can take "
                        f"them (mv {kept[0]} {out_dir / 'teacher.pth'})")
        saved = torch.load(kept[0], weights_only=True)
        assert saved["classes"] == ["class_0", "class_1", "class_2"] and saved["arch"] == "resnet18"
        torchvision.models.resnet18(num_classes=3).load_state_dict(saved["state_dict"])
    else:
        assert kept == []
        assert line == (f"error: could not write --out {out_dir / 'teacher.pth'} (No space left on device), nor "
                        f"a copy in {spare}: nothing was written, and the trained weights are lost; free disk "
                        f"space (or set TMPDIR to a folder with space) and train again")


# Runs SCRIPT FLAGS... (a path, or a module run as `python -m`) where the system starts at most two
# more processes, as under a per-user process limit (ulimit -u), which does not bind root.
PROCESS_LIMIT = """
import errno, os, runpy, sys
forks, real_fork = 0, os.fork
def limited_fork():
    global forks
    forks += 1
    if forks > 2:
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    return real_fork()
os.fork = limited_fork
""" + RUN_TARGET


@pytest.fixture(scope="module")
def checkpoint(tiny_data, teacher_weights, tmp_path_factory):
    """A step-2 checkpoint of one epoch on tiny_data."""
    save = tmp_path_factory.mktemp("trained")
    step1 = run_bounded([sys.executable, "step1/train.py", *map(str, train_args(tiny_data, teacher_weights, save))])
    assert step1.returncode == 0, step1.stderr[-3000:]
    return str(save / run_folder.LAST)


def one_error_line(result):
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["step1/train.py", "evaluate.py", "tools.train_teacher", "tools.landscape"])
def test_loader_workers_the_system_refuses_are_one_error_line(command, tiny_data, teacher_weights, checkpoint,
                                                              tmp_path):
    args = {"step1/train.py": train_args(tiny_data, teacher_weights, tmp_path / "run"),
            "evaluate.py": ["--data", tiny_data, "--checkpoint", checkpoint, "--device", "cpu"],
            "tools.train_teacher": teacher_args(tiny_data, tmp_path / "t.pth"),
            "tools.landscape": ["--data", tiny_data, "--checkpoint", checkpoint, "--out", tmp_path / "ls",
                                "--points", 3, "--batches", 1, "--batch_size", 4, "--device", "cpu"]}[command]
    result = run_bounded([sys.executable, "-c", PROCESS_LIMIT, command, *map(str, args), "--workers", "8"])
    line = one_error_line(result)
    assert line.startswith("error: the system refused to start the data loader's 8 worker processes ([Errno 11] "
                           "Resource temporarily unavailable; this user may run at most ")
    assert line.endswith(" processes and threads, ulimit -u): pass a smaller --workers")


# Runs step 1 (FLAGS...) and removes its run folder (the value of --save) after its second optimizer
# step, as a user cleaning up the wrong folder would.
REMOVED_MID_RUN = """
import runpy, shutil, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = 0
def remove_the_run_folder(*_):
    global steps
    steps += 1
    if steps == 2:
        shutil.rmtree(sys.argv[sys.argv.index("--save") + 1])
register_optimizer_step_post_hook(remove_the_run_folder)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--save_every_iters", 1, "--print_freq", 100], []])
def test_a_run_folder_removed_mid_run_is_one_line_that_says_so(tiny_data, teacher_weights, tmp_path, extra):
    # With --save_every_iters the next checkpoint finds it gone; without, the log's next line.
    save = tmp_path / "run"
    args = train_args(tiny_data, teacher_weights, save, "--batch_size", 4, *extra)
    result = run_bounded([sys.executable, "-c", REMOVED_MID_RUN, "step1/train.py", *map(str, args)])
    line = one_error_line(result)
    assert line == (f"error: the run folder {save} was removed while this run used it, and its checkpoints "
                    f"with it: this run stops without writing more; restore the folder to resume, or run the "
                    f"same command to train from the start")
    assert not save.exists()


def test_a_tensorboard_path_that_is_a_file_gets_the_fix_that_applies(tmp_path):
    (tmp_path / "tensorboard").write_text("a file where the events folder goes")
    with pytest.raises(UserError) as refused:
        monitor.MetricsLog(str(tmp_path), True)
    message = str(refused.value)
    assert message.startswith(f"could not write the metrics in {tmp_path} (")
    assert f"{tmp_path / 'tensorboard'}" in message and "free disk space" not in message
    assert message.endswith("no checkpoint of this run was written there yet: a file stands where a folder is "
                            "needed: move it away or pass another --save, then run the same command")


def test_a_step1_file_of_another_architecture_gets_the_fix_that_applies(tiny_data, teacher_weights, tmp_path,
                                                                       capsys, restore_argv):
    step1 = tmp_path / "step1.pth.tar"
    torch.save({"state_dict": reactnet(3).state_dict(), "step": 1, "num_classes": 3, "arch": "reactnet_a"}, step1)
    argv = train_args(tiny_data, teacher_weights, tmp_path / "run", "--step1_checkpoint", step1,
                      "--arch", "reactnet_18")
    line = main_error_line(train_main(2), argv, capsys)
    assert line == (f"error: {step1} was trained with --arch reactnet_a, not reactnet_18: drop --arch to start "
                    f"from it (step 2 takes the step-1 file's), or pass the --step1_checkpoint of a step-1 run "
                    f"with --arch reactnet_18")


def test_a_write_failure_names_what_is_intact_and_the_fix(tmp_path, monkeypatch):
    # No checkpoint yet: the first one fails on a read-only file system.
    def read_only(obj, path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(torch, "save", read_only)
    with pytest.raises(UserError) as refused:
        run_folder.save({"epoch": 1}, tmp_path)
    assert str(refused.value) == (f"could not write {tmp_path / run_folder.LAST} (Read-only file system: "
                                  f"{tmp_path / run_folder.LAST}{run_folder.PARTIAL}{os.getpid()}); no checkpoint "
                                  f"of this run was written there yet: pass a --save on a writable file system, "
                                  f"then run the same command")
    assert os.listdir(tmp_path) == []
    shutil.rmtree(tmp_path)
    with pytest.raises(UserError, match="the run folder .* was removed while this run used it"):
        run_folder.save({"epoch": 1}, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate.py", "tools/train_teacher.py"])
def test_a_batch_that_never_comes_is_one_error_line(command, tiny_data, checkpoint, tmp_path):
    args = {"evaluate.py": ["--data", tiny_data, "--checkpoint", checkpoint, "--device", "cpu",
                            "--batch_size", 4],
            "tools/train_teacher.py": teacher_args(tiny_data, tmp_path / "t.pth", "--batch_size", 4)}[command]
    split = "val" if command == "evaluate.py" else "train"
    result = run_bounded([sys.executable, "-c", STUCK_WORKER, command, *map(str, args), "--workers", "2",
                          "--data_timeout", "3"], env={"STUCK_SPLIT": split, "STUCK_AFTER": "4"})
    line = one_error_line(result)
    assert line == ("error: no batch came from the data loader in 3 s (--data_timeout): a loader worker is stuck, "
                    "most likely reading from a file system that stopped answering (a hung network mount), or "
                    "the storage is that slow; check the storage (a larger --data_timeout waits longer), then "
                    "run the command again")
    assert not (tmp_path / "t.pth").exists()
