"""Fixtures shared by the tests: a tiny ImageFolder dataset and a teacher trained for nothing."""
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 3

torch.set_num_threads(1)


def write_image_folder(root, per_class, num_classes=NUM_CLASSES, size=(40, 36), seed=0, image_format="PNG"):
    """Writes ``root/{train,val}/class_k/*.png`` (or ``*.JPEG`` with ``image_format="JPEG"``): noise
    whose mean brightness depends on the class."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for k in range(num_classes):
            folder = os.path.join(root, split, f"class_{k}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = rng.random((size[0], size[1], 3)) * 90 + 70 * k
                name = f"{i}.png" if image_format == "PNG" else f"{i}.{image_format}"
                Image.fromarray(pixels.astype(np.uint8)).save(os.path.join(folder, name), image_format)
    return str(root)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """3 classes, 8 train and 4 val images each."""
    return write_image_folder(tmp_path_factory.mktemp("data"), {"train": 8, "val": 4})


@pytest.fixture(scope="session")
def teacher_weights(tmp_path_factory):
    """A randomly initialised resnet18 state_dict for NUM_CLASSES classes."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=NUM_CLASSES).state_dict(), path)
    return str(path)


def run_script(script, *args, env=None, cwd=None, timeout=600):
    """Runs a repository script in a fresh interpreter; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)],
                          capture_output=True, text=True, env=full_env, cwd=cwd or REPO, timeout=timeout)


def run_tool(name, *args, env=None, timeout=600):
    """Runs ``python -m tools.NAME`` from the repository root; returns the CompletedProcess."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", f"tools.{name}", *map(str, args)], capture_output=True,
                          text=True, env=full_env, cwd=REPO, timeout=timeout)


def single_error_line(result):
    """The one ``error:`` line of a failed command that printed no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def main_error_line(main, argv, capsys):
    """What a tool's ``main(argv)``, run in this process, printed on stderr: it must exit with status
    2 after printing exactly one line, an ``error:`` line."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and err.endswith("\n"), err
    return err.rstrip("\n")


def train_args(data, teacher, save, *extra, epochs=1, batch_size=8):
    """Flags for a fast step-1/step-2 run on ``tiny_data``."""
    return ["--data", data, "--teacher", "resnet18", "--teacher_weights", teacher, "--save", save,
            "--epochs", epochs, "--batch_size", batch_size, "--image_size", 32, "-j", 0,
            "--device", "cpu", *extra]


def succeeded(result):
    """``result`` of a command that exited with status 0."""
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_sh(step, env_vars, *extra, cwd):
    """``bash stepN/run.sh`` configured through the environment, as its header describes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **env_vars,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    return subprocess.run(["bash", os.path.join(REPO, f"step{step}", "run.sh"), *map(str, extra)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def evaluate_args(data, checkpoint):
    """Flags of evaluate.py for a checkpoint trained by ``train_args``: none but the data and the
    file, since the checkpoint says what the run computed."""
    return ["--data", data, "--checkpoint", checkpoint]


def last_val_line(text):
    """The last `` * acc@1 X acc@5 Y`` line of an output."""
    lines = re.findall(r"^ \* acc@1 \S+ acc@5 \S+$", text, flags=re.M)
    assert lines, text[-2000:]
    return lines[-1]


def signalled_group(command, signal_name, after_step, env=None, leader_only=False, again_on=None):
    """Runs ``command`` (which starts tests/interrupted_run.py, waiting right after optimizer step
    ``after_step``) in a session of its own, and once it waits sends ``signal_name`` from here to its
    whole process group, as a cluster scheduler does, or with ``leader_only`` to ``command``'s own
    process alone (as ``sbatch --signal=B:TERM`` signals the batch shell). With ``again_on``, sends
    it once more when a line starting with ``again_on`` appears. Returns the CompletedProcess,
    stderr merged into stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERRUPT_SIGNAL=signal_name,
               INTERRUPT_AFTER_STEP=str(after_step), INTERRUPT_TARGET="outside", **(env or {}))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, start_new_session=True) as run, ends_within(run.pid, 600):
        send = os.kill if leader_only else os.killpg
        lines, waiting_for = [], "interrupted_run: waiting"
        for line in run.stdout:
            lines.append(line)
            if waiting_for and line.startswith(waiting_for):
                send(run.pid, getattr(signal, signal_name))
                waiting_for, again_on = again_on, None
                if waiting_for is None:
                    break
        output = "".join(lines) + run.stdout.read()
        returncode = run.wait()
    return subprocess.CompletedProcess(command, returncode, output, "")


def live_processes(group):
    """PIDs of the processes of process group ``group`` that have not ended (zombies count as ended)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            found.append(int(name))
    return found


@contextlib.contextmanager
def ends_within(group, seconds):
    """Fails the test, after SIGKILLing process group ``group``, if the block is still running
    ``seconds`` later (a command that hangs instead of ending)."""
    expired = threading.Event()

    def expire():
        expired.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)

    timer = threading.Timer(seconds, expire)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if expired.is_set():
        pytest.fail(f"still running {seconds} s later: it hangs instead of ending")


# The end of a `python -c WRAPPER TARGET FLAGS...` script: runs TARGET, a script's path or a module
# run as `python -m`, as the program, with FLAGS as its arguments.
RUN_TARGET = """
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""

# What STUCK_WORKER does before it runs its target: every loader worker is stuck, as in a read from a
# hung network mount, once it has read STUCK_AFTER images of the split STUCK_SPLIT (train, val, or
# empty for both).
STUCK_READS = """
import os, runpy, sys, time
from utils import data
read = data.read_with_pil
split, after = os.environ["STUCK_SPLIT"], int(os.environ["STUCK_AFTER"])
calls = 0
def stuck_read(path, *args):
    global calls
    if not split or f"{os.sep}{split}{os.sep}" in path:
        calls += 1
        if calls > after:
            time.sleep(300)
    return read(path, *args)
data.read_with_pil = stuck_read
"""
STUCK_WORKER = STUCK_READS + RUN_TARGET


def acting_on(command, trigger, act, env=None, within=60):
    """Runs ``command`` from the repository root in a session of its own; once it prints a line
    starting with ``trigger``, calls ``act(process)``. Fails the test unless it then ends within
    ``within`` seconds, and every process of its group within 30 s more. Returns the
    CompletedProcess, stderr merged into stdout."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                          cwd=REPO, start_new_session=True) as run:
        try:
            lines = []
            for line in run.stdout:
                lines.append(line)
                if line.startswith(trigger):
                    act(run)
                    break
            else:
                pytest.fail(f"it ended before printing {trigger!r}: {''.join(lines)[-2000:]}")
            try:
                lines.append(run.communicate(timeout=within)[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {within} s later: {''.join(lines)[-2000:]}")
            deadline = time.time() + 30
            while live_processes(run.pid) and time.time() < deadline:
                time.sleep(0.2)
            assert live_processes(run.pid) == [], "processes of its group outlived it"
        finally:
            with contextlib.suppress(ProcessLookupError):  # the group is gone when all went well
                os.killpg(run.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, run.returncode, "".join(lines), "")


def run_bounded(command, seconds=300, env=None):
    """Runs ``command`` from the repository root in a session of its own; fails the test if it does
    not end within ``seconds`` or leaves any process of its group alive. Returns the
    CompletedProcess (text)."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                          cwd=REPO, start_new_session=True) as run, ends_within(run.pid, seconds):
        stdout, stderr = run.communicate()
    assert live_processes(run.pid) == [], "processes of the command outlived it"
    return subprocess.CompletedProcess(command, run.returncode, stdout, stderr)
