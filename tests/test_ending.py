"""However a command ends (an error, a second Ctrl-C, an exception in a loader worker, SIGKILL,
a stop sent to run.sh alone) it ends within seconds, with every process it started, and says why in
one ``error:`` line when the user can fix it. Each run here has two loader workers, which is what
made an ending hang: they ignore SIGTERM, and Python's exit waited for them."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from conftest import (REPO, RUN_TARGET, STUCK_WORKER, acting_on, run_bounded, signalled_group, train_args,
                      write_image_folder)
from utils import run_folder

INTERRUPTED_RUN = os.path.join(REPO, "tests", "interrupted_run.py")
STEP1 = os.path.join(REPO, "step1", "train.py")


def step1(data, teacher, save, *extra, workers=2):
    return [sys.executable, STEP1, *map(str, train_args(data, teacher, save, *extra)), "-j", str(workers)]


def one_error_line(result, status=2):
    assert result.returncode == status, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.fixture
def mostly_unreadable(tmp_path):
    """Four training images, of which ``unreadable`` are not images: a batch of four holds
    ``4 - unreadable`` readable ones (too few to count against the unreadable-image limit)."""
    def make(unreadable):
        root = write_image_folder(tmp_path / f"data{unreadable}", {"train": 2, "val": 2}, num_classes=2)
        files = sorted((tmp_path / f"data{unreadable}" / "train").rglob("*.png"))
        for path in files[:unreadable]:
            path.write_bytes(b"not an image")
        return root
    return make


@pytest.mark.slow
def test_a_batch_of_one_image_is_one_error_line(tiny_data, teacher_weights, tmp_path):
    # At 32 px the last feature map is 1x1: BatchNorm cannot normalise one image.
    line = one_error_line(run_bounded(step1(tiny_data, teacher_weights, tmp_path, "--batch_size", 1)))
    assert "has 1 readable image" in line and "--batch_size of at least 2 per process" in line


def test_a_batch_size_beyond_int64_is_one_error_line(tiny_data, teacher_weights, tmp_path):
    line = one_error_line(run_bounded(step1(tiny_data, teacher_weights, tmp_path, "--batch_size", 2**63)))
    assert "--batch_size 9223372036854775808 is beyond the largest count taken" in line


@pytest.mark.slow
@pytest.mark.parametrize("unreadable, what", [(3, "has 1 readable image"), (4, "has no readable image")])
def test_a_batch_left_too_small_by_unreadable_files_is_one_error_line(mostly_unreadable, teacher_weights,
                                                                      tmp_path, unreadable, what):
    data = mostly_unreadable(unreadable)
    result = run_bounded(step1(data, teacher_weights, tmp_path / "run", "--batch_size", 4)
                         + ["--teacher_weights", save_teacher(tmp_path, 2)])
    line = one_error_line(result)
    assert what in line and f"{unreadable} of its images are unreadable" in line


def save_teacher(tmp_path, num_classes):
    path = tmp_path / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=num_classes).state_dict(), path)
    return str(path)


# Runs step 1 with the log's third append failing as a full disk fails it (the first two lines are
# written before the loader's workers start).
FULL_DISK_ON_LOG = """
import builtins, errno, runpy, sys
appends = 0
real_open = builtins.open
def open_filling_the_disk(file, mode="r", *args, **kwargs):
    global appends
    if str(file).endswith("log.txt") and "a" in mode:
        appends += 1
        if appends == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
    return real_open(file, mode, *args, **kwargs)
builtins.open = open_filling_the_disk
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 2)[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_when_the_log_is_appended_is_one_error_line(tiny_data, teacher_weights, tmp_path):
    command = step1(tiny_data, teacher_weights, tmp_path, "--print_freq", 1)
    line = one_error_line(run_bounded([sys.executable, "-c", FULL_DISK_ON_LOG, *command[1:]]))
    assert f"could not append to {tmp_path / 'log.txt'} (No space left on device)" in line


@pytest.mark.slow
def test_an_unreadable_image_whose_name_is_not_utf8_is_named(tiny_data, teacher_weights, tmp_path):
    data = tmp_path / "data"
    write_image_folder(data, {"train": 4, "val": 2})
    with open(os.path.join(os.fsencode(data / "train" / "class_0"), b"caf\xe9.png"), "wb") as f:
        f.write(b"not an image")
    result = run_bounded(step1(str(data), teacher_weights, tmp_path / "run", "--epochs", 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "caf\\xe9.png" in result.stdout
    assert "caf\\xe9.png" in (tmp_path / "run" / "log.txt").read_text()


# Runs step 1 with every loader worker failing on its third image, as a bug in reading would.
FAILING_WORKER = """
import runpy, sys
from utils import data
read = data.read_with_pil
calls = 0
def failing_read(*args):
    global calls
    calls += 1
    if calls == 3:
        raise RuntimeError("a bug in the worker")
    return read(*args)
data.read_with_pil = failing_read
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_an_exception_in_a_loader_worker_ends_the_run_with_its_traceback(tiny_data, teacher_weights, tmp_path):
    command = step1(tiny_data, teacher_weights, tmp_path)
    result = run_bounded([sys.executable, "-c", FAILING_WORKER, *command[1:]])
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" in result.stderr and "RuntimeError: a bug in the worker" in result.stderr


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tiny_data, teacher_weights, tmp_path):
    command = step1(tiny_data, teacher_weights, tmp_path, "--epochs", 2)
    stopped = signalled_group([sys.executable, INTERRUPTED_RUN, *command[1:]], "SIGINT", after_step=2,
                              env={"INTERRUPT_COUNT": "2"}, again_on="interrupted_run: received 1")
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    assert "error: interrupted by Ctrl-C at once" in stopped.stdout
    assert not (tmp_path / run_folder.LAST).exists()  # no checkpoint was due, none was written


@pytest.mark.slow
def test_ctrl_c_on_the_teacher_training_is_one_line(tiny_data, tmp_path):
    command = [sys.executable, INTERRUPTED_RUN, os.path.join(REPO, "tools", "train_teacher.py"),
               "--data", tiny_data, "--arch", "resnet18", "--epochs", "2", "--batch_size", "4",
               "--image_size", "32", "-j", "2", "--device", "cpu", "--out", str(tmp_path / "t.pth")]
    stopped = signalled_group(command, "SIGINT", after_step=1)
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    assert "error: interrupted by Ctrl-C" in stopped.stdout


def killed_leaves_nothing(command, progress):
    """Runs ``command`` with every loader worker stuck from its fourth read on (STUCK_WORKER),
    SIGKILLs it once it prints a line starting with ``progress`` (its workers are then stuck
    reading), and checks that none of the processes of its group (its loader workers) is alive 30 s
    later."""
    killed = acting_on([sys.executable, "-c", STUCK_WORKER, *command], progress, lambda run: run.kill(),
                       env={"STUCK_SPLIT": "", "STUCK_AFTER": "3"}, within=300)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:]


@pytest.mark.slow
def test_no_worker_outlives_a_sigkilled_training(tiny_data, teacher_weights, tmp_path):
    command = step1(tiny_data, teacher_weights, tmp_path, "--batch_size", 2, "--print_freq", 1)
    killed_leaves_nothing(command[1:], "Epoch: [0][")


@pytest.mark.slow
def test_no_worker_outlives_a_sigkilled_evaluation(tiny_data, teacher_weights, tmp_path):
    run = run_bounded(step1(tiny_data, teacher_weights, tmp_path, workers=0))
    assert run.returncode == 0, run.stderr[-3000:]
    command = [os.path.join(REPO, "evaluate.py"), "--data", tiny_data, "--checkpoint",
               str(tmp_path / run_folder.LAST), "--image_size", "32", "--batch_size", "2", "-j", "2",
               "--device", "cpu", "--print_freq", "1"]
    killed_leaves_nothing(command, "Test: [")


@pytest.mark.slow
def test_the_stop_ends_the_iteration_it_arrives_in(tiny_data, teacher_weights, tmp_path):
    # SIGTERM while the student's forward pass of step 3 (iteration 2 of 6) runs: that iteration
    # ends, is saved, and the run stops; none more is trained.
    command = step1(tiny_data, teacher_weights, tmp_path, "--epochs", 2, "--batch_size", 4)
    stopped = signalled_group([sys.executable, INTERRUPTED_RUN, *command[1:]], "SIGTERM", after_step=3,
                              env={"INTERRUPT_DURING": "forward"})
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 3; saved" in stopped.stdout
    saved = torch.load(tmp_path / run_folder.LAST, weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (0, 3)


@pytest.mark.slow
def test_a_removed_lock_file_does_not_let_a_second_run_in(tiny_data, teacher_weights, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        os.remove(tmp_path / run_folder.LOCK)
        second = run_bounded(step1(tiny_data, teacher_weights, tmp_path))
        assert f"the run folder {tmp_path} is in use by another run" in one_error_line(second)
        assert not (tmp_path / run_folder.LAST).exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


HOLDER = """
import sys, time
from utils import run_folder
lock = run_folder.RunFolderLock(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


# Takes run.lock alone, as a run does where the folder itself cannot be locked.
FILE_LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(os.path.join(sys.argv[1], "run.lock"), os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_run_whose_lock_file_was_taken_by_another_stops_before_writing(tmp_path):
    lock = run_folder.RunFolderLock(str(tmp_path))
    os.remove(tmp_path / run_folder.LOCK)
    lock.verify()  # nobody else took it: taken again
    assert os.path.samestat(os.stat(tmp_path / run_folder.LOCK), os.fstat(lock.fd))
    os.remove(tmp_path / run_folder.LOCK)
    other = subprocess.Popen([sys.executable, "-c", FILE_LOCK_HOLDER, str(tmp_path)], text=True,
                             stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert other.stdout.readline() == "locked\n"
        with pytest.raises(run_folder.UserError, match="another run has taken the folder"):
            lock.verify()
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
        lock.close()


def run_sh_command(tmp_path, tiny_data, teacher_weights, processes, port=None):
    """bash running utils/launch.sh as step1/run.sh sources it, whose train.py is
    tests/interrupted_run.py running step1/train.py; and its environment."""
    here = tmp_path / "step"
    here.mkdir()
    (here / "train.py").symlink_to(INTERRUPTED_RUN)
    save = tmp_path / "run"
    variables = dict(DATA=tiny_data, BATCH_SIZE=8, OPTIMIZER="adam", LEARNING_RATE=1e-3, EPOCHS=2,
                     WEIGHT_DECAY=5e-6, TEACHER="resnet18", TEACHER_WEIGHTS=teacher_weights, IMAGE_SIZE=32,
                     SEED=0, WORKERS=1, SAVE=save, LOG=save / "run.log", NGPUS=processes, NNODES=1,
                     NODE_RANK=0, MASTER_ADDR="127.0.0.1", MASTER_PORT=port or 29500)
    env = {name: str(value) for name, value in variables.items()}
    env.update(INTERRUPTED_SCRIPT=STEP1,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    script = f'set -euo pipefail; HERE="{here}"; STEP_FLAGS=(); source "{REPO}/utils/launch.sh"'
    return ["bash", "-c", script, "run.sh", "--device", "cpu", "--print_freq", "1"], env, save


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_run_sh_alone_stops_the_training_with_143(tiny_data, teacher_weights, tmp_path, processes):
    from test_distributed import free_port
    command, env, save = run_sh_command(tmp_path, tiny_data, teacher_weights, processes, free_port())
    stopped = signalled_group(command, "SIGTERM", after_step=1, env=env, leader_only=True)
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 2; saved" in stopped.stdout, stopped.stdout[-3000:]
    saved = torch.load(save / run_folder.LAST, weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)


def test_run_sh_refuses_a_port_that_is_not_one(tmp_path):
    command, env, _ = run_sh_command(tmp_path, str(tmp_path), "x", 2, port=70000)
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **env), timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: MASTER_PORT=70000 is not a TCP port")


@pytest.mark.slow
def test_a_plugin_that_raises_is_one_error_line(tiny_data, tmp_path):
    for source, expected in [("1 / 0\n", "ZeroDivisionError: division by zero at"),
                             ("def broken(:\n", "SyntaxError: ")]:
        plugin = tmp_path / "broken_plugin.py"
        plugin.write_text(source)
        result = run_bounded([sys.executable, "-m", "tools.summary", "--image_size", "32"],
                             env={"BNN_PLUGINS": str(plugin)})
        line = one_error_line(result)
        assert f"cannot import the plugin '{plugin}'" in line and expected in line and "broken_plugin.py" in line


def test_a_checkpoint_holding_code_is_refused_without_advice_to_run_it(tiny_data, tmp_path):
    class RunsACommand:
        def __reduce__(self):
            return os.system, ("true",)
    path = tmp_path / "payload.pth"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "extra": RunsACommand()}, path)
    result = run_bounded([sys.executable, "evaluate.py", "--data", tiny_data, "--checkpoint", str(path),
                          "--device", "cpu"])
    line = one_error_line(result)
    assert "holds Python code that loading would run" in line and "system" in line
    assert "weights_only" not in line and "False" not in line


def test_an_empty_save_folder_is_refused(tiny_data, teacher_weights, tmp_path):
    result = run_bounded(step1(tiny_data, teacher_weights, tmp_path)[:-2] + ["--save", "", "-j", "0"])
    assert "--save is empty" in one_error_line(result)


def test_a_class_folder_linked_into_another_is_named(tmp_path, teacher_weights):
    data = tmp_path / "data"
    write_image_folder(data, {"train": 4, "val": 2})
    os.symlink(data / "train" / "class_1", data / "train" / "class_0" / "more")
    result = run_bounded(step1(str(data), teacher_weights, tmp_path / "run"))
    line = one_error_line(result)
    assert "class_0/more (in class folder 'class_0') leads to" in line and "'class_1'" in line


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, processes", [("SIGUSR1", 1), ("SIGUSR2", 1), ("SIGUSR1", 2)])
def test_sigusr1_and_sigusr2_to_run_sh_alone_stop_the_training_as_sigterm_does(tiny_data, teacher_weights, tmp_path,
                                                                               signal_name, processes):
    # As `#SBATCH --signal=B:USR1@T` signals the batch shell: run.sh passes it on (through torchrun
    # with two processes), the training saves and stops, run.sh exits with 128 + its number.
    from test_distributed import free_port
    command, env, save = run_sh_command(tmp_path, tiny_data, teacher_weights, processes, free_port())
    stopped = signalled_group(command, signal_name, after_step=1, env=env, leader_only=True)
    signum = getattr(signal, signal_name)
    assert stopped.returncode == 128 + signum, stopped.stdout[-3000:]
    assert f"stopped by {signal_name} at epoch 0 iteration 2; saved" in stopped.stdout, stopped.stdout[-3000:]
    saved = torch.load(save / run_folder.LAST, weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)


@pytest.mark.slow
def test_sigusr1_to_the_whole_process_group_stops_the_training_as_sigterm_does(tiny_data, teacher_weights,
                                                                              tmp_path):
    # As `#SBATCH --signal=USR1@T` signals every process of the job, the loader workers included.
    command = step1(tiny_data, teacher_weights, tmp_path, "--epochs", 2, "--batch_size", 4)
    stopped = signalled_group([sys.executable, INTERRUPTED_RUN, *command[1:]], "SIGUSR1", after_step=1)
    assert stopped.returncode == 128 + signal.SIGUSR1, stopped.stdout[-3000:]
    assert "stopped by SIGUSR1 at epoch 0 iteration 2; saved" in stopped.stdout
    saved = torch.load(tmp_path / run_folder.LAST, weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)


def descendants(pid):
    """PIDs of every process started, directly or not, by process ``pid``."""
    parents = {}
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{name}/stat") as f:
                parents[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("target, processes", [("pid", 1), ("group", 1), ("group", 2)])
def test_a_training_ends_with_its_killed_run_sh_and_leaves_nothing(tiny_data, teacher_weights, tmp_path,
                                                                   target, processes):
    # SIGKILL of run.sh (its PID, or its process group as `kill -9 %1` and supervisors do) while the
    # training, in a process group of its own, waits after its first step: the kernel sends the
    # training SIGTERM (through torchrun with two processes), which saves and stops, and no process
    # that run.sh started (training, loader workers, torchrun) outlives that.
    from test_distributed import free_port
    command, env, save = run_sh_command(tmp_path, tiny_data, teacher_weights, processes, free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERRUPT_SIGNAL="SIGTERM", INTERRUPT_AFTER_STEP="1",
               INTERRUPT_TARGET="outside", **env)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          start_new_session=True) as run:
        started = []
        try:
            for line in run.stdout:
                if line.startswith("interrupted_run: waiting"):
                    break
            started = descendants(run.pid)
            assert started, "run.sh started nothing"
            (os.kill if target == "pid" else os.killpg)(run.pid, signal.SIGKILL)
            deadline = time.time() + 40  # interrupted_run itself gives up waiting after 60 s
            while any(alive(pid) for pid in started) and time.time() < deadline:
                time.sleep(0.2)
            assert not [pid for pid in started if alive(pid)], "processes started by run.sh outlived it"
        finally:
            for pid in started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert "=> stopped by SIGTERM at epoch 0 iteration 2; saved" in (save / "log.txt").read_text()
    saved = torch.load(save / run_folder.LAST, weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)


def test_run_sh_refuses_a_port_in_use_on_the_first_node(tmp_path):
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command, env, save = run_sh_command(tmp_path, str(tmp_path), "x", 2, port=port)
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, **env), timeout=60)
    line = one_error_line(result)
    assert line.startswith(f"error: MASTER_PORT={port} cannot be used on this node, the first (Address already "
                           f"in use): another job or a run still ending holds it; pick a free port")
    assert not save.exists()  # refused before anything started


# Runs a command (a script path, or a module run as `python -m`) with a Ctrl-C arriving while it
# imports torch, as it does when pressed during a command's first seconds.
CTRL_C_WHILE_IMPORTING = """
import builtins, os, runpy, signal, sys, time
real_import = builtins.__import__
def interrupted_import(name, *args, **kwargs):
    if name == "torch" and "torch" not in sys.modules:
        builtins.__import__ = real_import
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
    return real_import(name, *args, **kwargs)
builtins.__import__ = interrupted_import
""" + RUN_TARGET

COMMANDS = ["step1/train.py", "step2/train.py", "evaluate.py", "tools.ablation", "tools.benchmark",
            "tools.export_lce", "tools.flag_docs", "tools.landscape", "tools.make_demo_data", "tools.summary",
            "tools.train_teacher"]


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_while_a_command_starts_is_one_line(command):
    result = run_bounded([sys.executable, "-c", CTRL_C_WHILE_IMPORTING, command, "--help"], seconds=120)
    line = one_error_line(result, status=130)
    assert line == "error: interrupted by Ctrl-C while starting, before anything was read or written"
    assert result.stdout == ""
