"""torchrun with two CPU processes (gloo): same validation as one process, exact resume, clear errors."""
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script, signalled_group, train_args
from models import RunSpec
from utils import run_folder
from utils.errors import UserError
from utils.recipe import ADAMBNN
from utils.training_flags import build_parser, fill_defaults, validate_resolved


def torchrun_command(*args, processes=2, script=os.path.join(REPO, "step1", "train.py")):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", script, *map(str, args)]


def torchrun(*args):
    return subprocess.run(torchrun_command(*args), capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def summary_lines(output):
    return re.findall(r"^ \* acc@1 \S+ acc@5 \S+$", output, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def two_epoch_run(tiny_data, teacher_weights, tmp_path_factory):
    save = tmp_path_factory.mktemp("ddp")
    result = torchrun(*train_args(tiny_data, teacher_weights, save, epochs=2))
    assert result.returncode == 0, result.stdout + result.stderr
    return save, result.stdout


@pytest.mark.slow
def test_validation_matches_a_single_process_evaluation(tiny_data, two_epoch_run):
    save, output = two_epoch_run
    evaluated = run_script("evaluate.py", "--data", tiny_data, "--checkpoint", save / run_folder.LAST,
                           "--image_size", 32, "-j", 0, "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert summary_lines(evaluated.stdout) == summary_lines(output)[-1:]


@pytest.mark.slow
def test_only_rank_zero_writes_a_clean_checkpoint(two_epoch_run):
    save, output = two_epoch_run
    state = torch.load(save / run_folder.LAST, weights_only=True)
    assert state["args"]["world_size"] == 2 and state["epoch"] == 2
    assert not any(k.startswith("module.") for k in state["state_dict"])
    assert len(summary_lines(output)) == 2  # one line per epoch, not one per rank


def progress_lines(output):
    """``(epoch, iteration)`` of every training progress line, in order."""
    return [(int(e), int(i)) for e, i in re.findall(r"^Epoch: \[(\d+)\]\[\s*(\d+)/", output, re.M)]


@pytest.mark.slow
def test_preempted_ranks_resume_from_one_checkpoint_bit_identically(tiny_data, teacher_weights,
                                                                     tmp_path, two_epoch_run):
    save, _ = two_epoch_run
    args = train_args(tiny_data, teacher_weights, tmp_path, epochs=2)
    # Rank 0 sends SIGTERM to torchrun, as a cluster scheduler would, right after the update of
    # iteration 0 of epoch 0 (3 iterations per epoch, learning rate lr / 2), and waits until
    # torchrun has passed it on: the ranks agree to stop after iteration 1.
    wrapper = os.path.join(REPO, "tests", "interrupted_run.py")
    command = torchrun_command(os.path.join(REPO, "step1", "train.py"), *args, script=wrapper)
    env = dict(os.environ, OMP_NUM_THREADS="1", INTERRUPT_SIGNAL="SIGTERM", INTERRUPT_AFTER_STEP="1",
               INTERRUPT_TARGET="parent")
    preempted = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    output = preempted.stdout + preempted.stderr
    assert preempted.returncode != 0, output[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 2; saved" in preempted.stdout, output[-3000:]
    assert progress_lines(preempted.stdout) == [(0, 0), (0, 1)]
    stopped = torch.load(tmp_path / run_folder.LAST, weights_only=True)
    assert (stopped["epoch"], stopped["iteration"]) == (0, 2)
    expected = torch.load(save / run_folder.LAST, weights_only=True)["state_dict"]
    assert not torch.equal(stopped["state_dict"]["fc.weight"], expected["fc.weight"])  # work remains

    resumed = torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"^=> resuming \S+ at epoch 0 iteration 2 ", resumed.stdout, re.M)
    assert progress_lines(resumed.stdout) == [(0, 2), (1, 0), (1, 1), (1, 2)]
    actual = torch.load(tmp_path / run_folder.LAST, weights_only=True)["state_dict"]
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_to_run_sh_under_torchrun_saves_and_exits_with_143(tiny_data, teacher_weights, tmp_path):
    # utils/launch.sh as step1/run.sh sources it, starting two processes with torchrun, each with a
    # loader worker; its train.py is tests/interrupted_run.py running step1/train.py.
    here = tmp_path / "step"
    here.mkdir()
    (here / "train.py").symlink_to(os.path.join(REPO, "tests", "interrupted_run.py"))
    save = tmp_path / "run"
    variables = dict(DATA=tiny_data, BATCH_SIZE=8, OPTIMIZER="adam", LEARNING_RATE=1e-3, EPOCHS=2,
                     WEIGHT_DECAY=5e-6, TEACHER="resnet18", TEACHER_WEIGHTS=teacher_weights, IMAGE_SIZE=32, SEED=0,
                     WORKERS=1, SAVE=save, LOG=save / "run.log", NGPUS=2, NNODES=1, NODE_RANK=0,
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    env = {name: str(value) for name, value in variables.items()}
    env.update(INTERRUPTED_SCRIPT=os.path.join(REPO, "step1", "train.py"),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    script = f'set -euo pipefail; HERE="{here}"; STEP_FLAGS=(); source "{REPO}/utils/launch.sh"'
    # SIGTERM to the script's process group (bash, torchrun, tee) after the update of iteration 0:
    # torchrun passes it on to its processes and their workers, which agree to stop after iteration 1.
    stopped = signalled_group(["bash", "-c", script, "run.sh", "--device", "cpu", "--print_freq", "1"],
                              "SIGTERM", after_step=1, env=env)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-3000:]
    assert "stopped by SIGTERM at epoch 0 iteration 2; saved" in stopped.stdout, stopped.stdout[-3000:]
    assert "killed by signal" not in stopped.stdout
    assert "stopped by SIGTERM at epoch 0 iteration 2; saved" in (save / "run.log").read_text()
    saved = torch.load(save / run_folder.LAST, weights_only=True)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)


@pytest.mark.slow
def test_global_batch_must_divide_among_processes(tiny_data, teacher_weights, tmp_path):
    result = torchrun(*train_args(tiny_data, teacher_weights, tmp_path, batch_size=9))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch_size 9 (the global batch) does not divide among 2 processes: "
                      "use a multiple of 2"]


def test_the_recipes_global_batch_is_checked_against_the_processes(tiny_data):
    """Not given, the batch is the recipe's, known once the run's spec is: it is checked then."""
    args = fill_defaults(build_parser(1).parse_args(["--data", tiny_data]), ADAMBNN, 1)
    validate_resolved(args, RunSpec(), world_size=ADAMBNN.batch_size // 2)
    with pytest.raises(UserError, match=f"--batch_size {ADAMBNN.batch_size} \\(the global batch\\) does not "
                                        f"divide among 3 processes: use a multiple of 3"):
        validate_resolved(args, RunSpec(), world_size=3)
