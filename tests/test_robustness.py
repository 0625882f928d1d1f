"""A run survives kills, preemption, full disks, corrupt images and divergence without losing work."""
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from conftest import (REPO, RUN_TARGET, STUCK_READS, STUCK_WORKER, acting_on, run_script, signalled_group,
                      succeeded, train_args, write_image_folder)
from models import reactnet
from utils import run_folder
from utils.errors import UserError

STEP1 = os.path.join(REPO, "step1", "train.py")
INTERRUPTED_RUN = os.path.join(REPO, "tests", "interrupted_run.py")


def step1_command(data, teacher, save, *extra, epochs=2):
    """Two epochs of 6 iterations on tiny_data: epoch 0 trains at lr / 2, epoch 1 at 0."""
    return [sys.executable, STEP1, *map(str, train_args(data, teacher, save, "--print_freq", 1,
                                                        *extra, epochs=epochs, batch_size=4))]


def interrupted(command, signal_name, after_step):
    """``command`` run through tests/interrupted_run.py, which sends ``signal_name`` to the run
    itself right after its optimizer step number ``after_step``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERRUPT_SIGNAL=signal_name,
               INTERRUPT_AFTER_STEP=str(after_step))
    return subprocess.run([sys.executable, INTERRUPTED_RUN, *command[1:]], capture_output=True,
                          text=True, env=env)


def checkpoint(save):
    return torch.load(os.path.join(save, run_folder.LAST), weights_only=True)


def final_weights(save):
    return checkpoint(save)["state_dict"]


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def adam_moments(state):
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


def progress_lines(output):
    """``(epoch, iteration)`` of every training progress line, in order."""
    return [(int(e), int(i)) for e, i in re.findall(r"^Epoch: \[(\d+)\]\[\s*(\d+)/", output, re.M)]


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def uninterrupted_folder(tiny_data, teacher_weights, tmp_path_factory):
    """The run folder of a 2-epoch run that nothing interrupts."""
    save = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(step1_command(tiny_data, teacher_weights, save), check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))
    return save


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_folder):
    """Final state of the run that nothing interrupts."""
    return checkpoint(uninterrupted_folder)


def training_records(save):
    """Per epoch, the training loss and accuracies metrics.jsonl recorded."""
    with open(os.path.join(save, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k.startswith("train_")} | {"epoch": r["epoch"]} for r in records]


def assert_resumed_to_the_uninterrupted_end(command, stopped_at, uninterrupted, save):
    """The rerun continues at ``stopped_at`` (never from the start) and ends bit-identical."""
    resumed = subprocess.run(command, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch, iteration = stopped_at
    assert re.search(rf"^=> resuming \S+ at epoch {epoch} iteration {iteration} ", resumed.stdout, re.M)
    lines = progress_lines(resumed.stdout)
    assert lines[0] == stopped_at and lines[-1] == (1, 5) and len(lines) == 12 - 6 * epoch - iteration
    final = checkpoint(save)
    assert_bit_identical(final["state_dict"], uninterrupted["state_dict"])
    assert_bit_identical(adam_moments(final), adam_moments(uninterrupted))


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tiny_data, teacher_weights, tmp_path,
                                                         uninterrupted, uninterrupted_folder):
    command = step1_command(tiny_data, teacher_weights, tmp_path, "--save_every_iters", 2)
    # Killed during iteration 3 of epoch 0 (learning rate lr / 2), after its update and before
    # the checkpoint of iteration 4: the updates of iterations 2 and 3 are lost and redone.
    killed = interrupted(command, "SIGKILL", after_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert progress_lines(killed.stdout) == [(0, 0), (0, 1), (0, 2)]
    assert re.search(r"^learning_rate: 0.000625$", killed.stdout, re.M)
    saved = checkpoint(tmp_path)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)
    # What remains to train changes the weights, so a resume that lost anything would show.
    assert not torch.equal(saved["state_dict"]["fc.weight"], uninterrupted["state_dict"]["fc.weight"])
    assert_resumed_to_the_uninterrupted_end(command, (0, 2), uninterrupted, tmp_path)
    # Epoch 0's record covers its 6 iterations, the 2 before the resume included.
    assert training_records(tmp_path) == training_records(uninterrupted_folder)


@pytest.mark.slow
def test_sigterm_to_the_process_group_saves_mid_epoch_and_resume_is_bit_identical(
        tiny_data, teacher_weights, tmp_path, uninterrupted):
    command = step1_command(tiny_data, teacher_weights, tmp_path, "--workers", 2)
    # During iteration 1 of epoch 0 (learning rate lr / 2) the run and its two loader workers get
    # SIGTERM: the workers keep loading, the run finishes iteration 2, saves and stops.
    stopped = signalled_group([sys.executable, INTERRUPTED_RUN, *command[1:]], "SIGTERM", after_step=2)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 3; saved" in stopped.stdout
    assert "killed by signal" not in stopped.stdout
    assert progress_lines(stopped.stdout) == [(0, 0), (0, 1), (0, 2)]
    saved = checkpoint(tmp_path)
    assert (saved["epoch"], saved["iteration"]) == (0, 3)
    assert not torch.equal(saved["state_dict"]["fc.weight"], uninterrupted["state_dict"]["fc.weight"])
    assert_resumed_to_the_uninterrupted_end(command, (0, 3), uninterrupted, tmp_path)


def waiting_run(command, trigger, act, split="train", after=4):
    """Runs ``command`` (a step-1 training, two loader workers) with its workers stuck after
    ``after`` reads of ``split`` (STUCK_WORKER); once it prints a line starting with ``trigger`` and
    then waits for its stuck batch, calls ``act(process)``, and fails the test unless the run ends
    within 60 s with every process it started (``acting_on``)."""
    def in_the_wait(run):
        time.sleep(2)  # the next batch is the stuck one: the run now waits for it
        act(run)
    return acting_on([sys.executable, "-c", STUCK_WORKER, *command[1:]], trigger, in_the_wait,
                     env={"STUCK_SPLIT": split, "STUCK_AFTER": str(after)})


def one_line_of(output):
    """The one ``error:`` line of an output with stderr merged in, which holds no traceback."""
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output[-3000:]
    return errors[0]


@pytest.mark.slow
def test_a_stop_while_a_worker_is_stuck_is_honoured_and_resumes_bit_identical(tiny_data, teacher_weights,
                                                                              tmp_path, uninterrupted):
    # Each worker is stuck in the first read of its second batch: batches 0 and 1 come, 2 never.
    command = step1_command(tiny_data, teacher_weights, tmp_path, "--workers", 2)
    stopped = waiting_run(command, "Epoch: [0][1/6]", lambda run: os.killpg(run.pid, signal.SIGTERM))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 2; saved" in stopped.stdout
    assert (checkpoint(tmp_path)["epoch"], checkpoint(tmp_path)["iteration"]) == (0, 2)
    assert_resumed_to_the_uninterrupted_end(command, (0, 2), uninterrupted, tmp_path)


@pytest.mark.slow
def test_a_batch_that_never_comes_ends_the_run_with_a_resumable_checkpoint(tiny_data, teacher_weights,
                                                                          tmp_path, uninterrupted):
    command = step1_command(tiny_data, teacher_weights, tmp_path, "--workers", 2, "--data_timeout", 5)
    ended = waiting_run(command, "Epoch: [0][1/6]", lambda run: None)
    assert ended.returncode == 2, ended.stdout[-3000:]
    line = one_line_of(ended.stdout)
    assert line.startswith("error: no batch came from the data loader in 5 s (--data_timeout): a loader "
                           "worker is stuck, most likely reading from a file system that stopped answering")
    assert line.endswith(f"; saved {tmp_path / run_folder.LAST} at epoch 0 iteration 2: check the storage (a "
                         f"larger --data_timeout waits longer), then run the same command to resume")
    assert_resumed_to_the_uninterrupted_end(command, (0, 2), uninterrupted, tmp_path)


@pytest.mark.slow
def test_a_stop_while_validation_waits_saves_the_epochs_training(tiny_data, teacher_weights, tmp_path,
                                                                 uninterrupted, uninterrupted_folder):
    command = step1_command(tiny_data, teacher_weights, tmp_path, "--workers", 2)
    stopped = waiting_run(command, "Epoch: [0][5/6]", lambda run: os.killpg(run.pid, signal.SIGTERM),
                          split="val", after=0)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 6; saved" in stopped.stdout
    # The resume validates epoch 0 again, without training it again, then trains epoch 1.
    resumed = succeeded(subprocess.run(command, capture_output=True, text=True,
                                       env=dict(os.environ, OMP_NUM_THREADS="1")))
    assert re.search(r"^=> resuming \S+ at epoch 0 iteration 6 ", resumed.stdout, re.M)
    assert progress_lines(resumed.stdout) == [(1, i) for i in range(6)]
    final = checkpoint(tmp_path)
    assert_bit_identical(final["state_dict"], uninterrupted["state_dict"])
    assert_bit_identical(adam_moments(final), adam_moments(uninterrupted))
    assert training_records(tmp_path) == training_records(uninterrupted_folder)


# STUCK_WORKER, and during the second optimizer step the run's first loader worker is SIGKILLed as
# the out-of-memory killer does, while the run computes: its SIGCHLD arrives in the middle of the step.
KILLED_DURING_A_STEP = STUCK_READS + """
import signal
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = 0
def kill_a_worker(*_):
    global steps
    steps += 1
    if steps == 2:
        children = []
        for name in filter(str.isdigit, os.listdir("/proc")):
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    children.append(int(name))
        print(f"killing loader worker {min(children)}", flush=True)
        os.kill(min(children), signal.SIGKILL)
        time.sleep(2)
register_optimizer_step_post_hook(kill_a_worker)
""" + RUN_TARGET


@pytest.mark.slow
def test_a_worker_killed_by_the_oom_killer_ends_the_run_with_a_resumable_checkpoint(
        tiny_data, teacher_weights, tmp_path, uninterrupted):
    # Killed while it reads its second batch: batches 0 and 1 came, the run finishes iteration 1,
    # then waits for batch 2.
    command = step1_command(tiny_data, teacher_weights, tmp_path, "--workers", 2)
    ended = subprocess.run([sys.executable, "-c", KILLED_DURING_A_STEP, *command[1:]], capture_output=True,
                           text=True, cwd=REPO, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1", STUCK_SPLIT="train", STUCK_AFTER="4"))
    assert ended.returncode == 2, ended.stdout[-2000:] + ended.stderr[-3000:]
    worker = re.search(r"^killing loader worker (\d+)$", ended.stdout, re.M).group(1)
    assert one_line_of(ended.stderr) == (
        f"error: a data-loading worker (process {worker}) ended unexpectedly, most likely killed by the kernel's "
        f"out-of-memory killer (see dmesg); saved {tmp_path / run_folder.LAST} at epoch 0 iteration 2: if memory "
        f"is short, use fewer --workers or a smaller --batch_size, then run the same command to resume")
    assert_resumed_to_the_uninterrupted_end(command, (0, 2), uninterrupted, tmp_path)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run_folder.save({"epoch": 1}, tmp_path)
    before = (tmp_path / run_folder.LAST).read_bytes()

    def disk_full(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match="No space left on device.*previous file there is intact"):
        run_folder.save({"epoch": 2}, tmp_path)
    assert (tmp_path / run_folder.LAST).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [run_folder.LAST]


@pytest.mark.slow
def test_partial_file_from_a_crash_is_removed_and_never_loaded(tiny_data, teacher_weights, tmp_path):
    partial = tmp_path / f"{run_folder.LAST}{run_folder.PARTIAL}999"
    partial.write_bytes(b"garbage from a crash")
    users = ["thesis.partial.draft.tex", "dataset.tar.partial.3", f"{run_folder.LAST}.partial.3.bak"]
    for name in users:
        (tmp_path / name).write_text("the user's")
    result = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, tmp_path))
    assert result.returncode == 0, result.stderr
    assert not partial.exists()
    assert all((tmp_path / name).read_text() == "the user's" for name in users)
    assert torch.load(tmp_path / run_folder.LAST, weights_only=True)["epoch"] == 1


HOLDER = """
import os, sys, time
from utils import run_folder
lock = run_folder.RunFolderLock(sys.argv[1])
if os.fork() == 0:  # a child that outlives its parent for a while, as a loader worker can
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.mark.slow
def test_one_run_per_run_folder_and_a_killed_run_never_blocks_it(tiny_data, teacher_weights, tmp_path):
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, text=True,
                          stdout=subprocess.PIPE, start_new_session=True) as holder:
        try:
            assert holder.stdout.readline() == "locked\n"
            second = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, tmp_path))
            line = one_error_line(second)
            assert f"the run folder {tmp_path} is in use by another run (process {holder.pid} on " in line
            assert sorted(os.listdir(tmp_path)) == [run_folder.LOCK]
            holder.kill()
            holder.wait()
            # The holder's forked child still runs, but the lock ended with the holder.
            run_folder.RunFolderLock(str(tmp_path)).close()
        finally:
            os.killpg(holder.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_second_run_in_the_folder_of_a_running_one_is_refused(tiny_data, teacher_weights, tmp_path):
    save = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERRUPT_SIGNAL="SIGTERM", INTERRUPT_AFTER_STEP="1",
               INTERRUPT_TARGET="outside")  # the first run waits after its first step
    command = [sys.executable, INTERRUPTED_RUN, *step1_command(tiny_data, teacher_weights, save)[1:]]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as first:
        try:
            output = []
            for line in first.stdout:
                output.append(line)
                if line.startswith("interrupted_run: waiting"):
                    break
            assert first.poll() is None, "".join(output)[-3000:]
            second = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, save))
            line = one_error_line(second)
            assert f"the run folder {save} is in use by another run (process {first.pid} on " in line
        finally:
            os.killpg(first.pid, signal.SIGKILL)


@pytest.fixture
def one_epoch_run(tiny_data, teacher_weights, tmp_path):
    result = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, tmp_path))
    assert result.returncode == 0, result.stderr
    return tmp_path


def limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_full_disk_while_saving_stops_cleanly(tiny_data, teacher_weights, one_epoch_run):
    before = (one_epoch_run / run_folder.LAST).read_bytes()
    # Two epochs of batch 4 continue the one-epoch run of batch 8 on request, so that a write happens.
    command = step1_command(tiny_data, teacher_weights, one_epoch_run, "--resume_with_changes")
    result = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_file_size(10**7),
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = one_error_line(result)
    assert "could not write" in line and "previous file there is intact" in line
    assert (one_epoch_run / run_folder.LAST).read_bytes() == before
    assert not [name for name in os.listdir(one_epoch_run) if run_folder.PARTIAL in name]


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_data, teacher_weights, one_epoch_run):
    poisoned = one_epoch_run / "nan_teacher.pth"
    state = torch.load(teacher_weights, weights_only=True)
    state["fc.bias"][0] = float("nan")
    torch.save(state, poisoned)
    before = (one_epoch_run / run_folder.LAST).read_bytes()
    args = train_args(tiny_data, poisoned, one_epoch_run, "--resume_with_changes", epochs=2)
    line = one_error_line(run_script("step1/train.py", *args))
    assert "non-finite" in line and "epoch 1 iteration 0" in line
    assert (one_epoch_run / run_folder.LAST).read_bytes() == before


@pytest.mark.slow
def test_non_finite_weights_are_never_saved_and_the_last_checkpoint_resumes(tiny_data, teacher_weights,
                                                                            one_epoch_run, tmp_path_factory):
    before = (one_epoch_run / run_folder.LAST).read_bytes()
    # A weight decay of 1e38 passes the flag checks, but squared in Adam's second moment it
    # overflows float32: the loss and the weights stay finite, the optimizer state does not.
    args = train_args(tiny_data, teacher_weights, one_epoch_run, "--resume_with_changes",
                      "--weight_decay", 1e38, "--save_every_iters", 1, epochs=3)
    line = one_error_line(run_script("step1/train.py", *args))
    assert "became NaN or infinite by epoch 1 iteration 1" in line and "not saved" in line
    assert f"the checkpoint in {one_epoch_run} (epoch 1 iteration 0) is kept" in line
    assert (one_epoch_run / run_folder.LAST).read_bytes() == before
    # Such a checkpoint, written by an earlier version, is refused instead of resumed.
    state = checkpoint(one_epoch_run)
    state["optimizer"]["state"][0]["exp_avg_sq"][0] = float("inf")
    poisoned = tmp_path_factory.mktemp("poisoned")
    torch.save(state, poisoned / run_folder.LAST)
    line = one_error_line(run_script("step1/train.py", *train_args(tiny_data, teacher_weights, poisoned)))
    assert f"{poisoned / run_folder.LAST} holds NaN or infinite weights or optimizer state" in line
    # As the message says: with a lower weight decay and --resume_with_changes it continues.
    args = train_args(tiny_data, teacher_weights, one_epoch_run, "--resume_with_changes", epochs=2)
    resumed = run_script("step1/train.py", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"^=> resuming \S+ at epoch 1 iteration 0 ", resumed.stdout, re.M)
    final = checkpoint(one_epoch_run)
    assert final["epoch"] == 2
    tensors = {**final["state_dict"], **adam_moments(final)}
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert torch.equal(adam_moments(final)["0.step"], torch.tensor(6.0))  # 3 updates in each epoch


@pytest.fixture
def corrupt_data(tiny_data, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "train" / "class_0" / "not_an_image.png").write_text("plain text")
    good = (root / "train" / "class_1" / "0.png").read_bytes()
    (root / "train" / "class_1" / "truncated.png").write_bytes(good[: len(good) // 3])
    return root


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_named(corrupt_data, teacher_weights, tmp_path):
    result = run_script("step1/train.py", *train_args(corrupt_data, teacher_weights, tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "skipped unreadable image" in result.stdout
    assert "not_an_image.png" in result.stdout and "truncated.png" in result.stdout
    assert "2 unreadable training images skipped" in result.stdout


@pytest.mark.slow
def test_corrupt_images_beyond_the_limit_stop_the_run(corrupt_data, teacher_weights, tmp_path):
    args = train_args(corrupt_data, teacher_weights, tmp_path / "run", "--max_unreadable_share", 0)
    line = one_error_line(run_script("step1/train.py", *args))
    assert "unreadable" in line and "--max_unreadable_share" in line


@pytest.mark.slow
def test_resuming_a_run_folder_of_another_class_count_is_refused(teacher_weights, one_epoch_run, tmp_path):
    four_classes = write_image_folder(tmp_path / "four", {"train": 2, "val": 1}, num_classes=4)
    torch.manual_seed(0)
    teacher4 = tmp_path / "teacher4.pth"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), teacher4)
    line = one_error_line(run_script("step1/train.py", *train_args(four_classes, teacher4, one_epoch_run)))
    assert "3 classes" in line and "4 classes" in line and "new --save" in line


@pytest.fixture
def corrupt_val(tiny_data, tmp_path):
    """tiny_data (12 val images) with a text file among the val images, and a checkpoint to evaluate."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "val" / "class_2" / "not_an_image.png").write_text("plain text")
    torch.manual_seed(0)
    checkpoint = tmp_path / "bare.pth"
    torch.save(reactnet(3, binary_weights=True).state_dict(), checkpoint)
    return root, checkpoint


def evaluate_corrupt_val(corrupt_val, *flags):
    data, checkpoint = corrupt_val
    return run_script("evaluate.py", "--data", data, "--checkpoint", checkpoint, "--image_size", 32,
                      "--batch_size", 13, "-j", 0, "--device", "cpu", *flags)


@pytest.mark.slow
def test_unreadable_validation_images_are_counted_after_the_summary(corrupt_val):
    result = evaluate_corrupt_val(corrupt_val)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    summary = next(i for i, line in enumerate(lines) if line.startswith(" * acc@1 "))
    assert re.fullmatch(r" \* acc@1 \d+\.\d{3} acc@5 \d+\.\d{3}", lines[summary])
    assert lines[summary + 1] == " * 1 unreadable of 13 validation images excluded from these accuracies"
    assert "not_an_image.png" in result.stdout


@pytest.mark.slow
def test_too_many_unreadable_validation_images_stop_the_evaluation(corrupt_val):
    line = one_error_line(evaluate_corrupt_val(corrupt_val, "--max_unreadable_share", 0))
    assert "1 of the 13 validation images" in line and "--max_unreadable_share" in line


def test_console_log_outlives_the_reader_of_the_output(tmp_path, monkeypatch):
    # `python train.py | tee log` under scancel: tee dies with the job, the run must still save.
    read_end, write_end = os.pipe()
    os.close(read_end)
    monkeypatch.setattr(sys, "stdout", os.fdopen(write_end, "w"))
    log = run_folder.ConsoleLog(str(tmp_path / "log.txt"))
    log("Epoch: [0][2/6]")
    log("=> stopped by SIGTERM")
    assert (tmp_path / "log.txt").read_text() == "Epoch: [0][2/6]\n=> stopped by SIGTERM\n"
