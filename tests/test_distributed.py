"""torchrun with two CPU processes (gloo): same validation as one process, exact resume, clear errors."""
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, run_script, train_args
from utils import run_folder


def torchrun_command(*args, processes=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", os.path.join(REPO, "step1", "train.py"), *map(str, args)]


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


def test_validation_matches_a_single_process_evaluation(tiny_data, two_epoch_run):
    save, output = two_epoch_run
    evaluated = run_script("evaluate.py", "--data", tiny_data, "--checkpoint", save / run_folder.LAST,
                           "--image_size", 32, "-j", 0, "--device", "cpu")
    assert evaluated.returncode == 0, evaluated.stderr
    assert summary_lines(evaluated.stdout) == summary_lines(output)[-1:]


def test_only_rank_zero_writes_a_clean_checkpoint(two_epoch_run):
    save, output = two_epoch_run
    state = torch.load(save / run_folder.LAST, weights_only=True)
    assert state["args"]["world_size"] == 2 and state["epoch"] == 2
    assert not any(k.startswith("module.") for k in state["state_dict"])
    assert len(summary_lines(output)) == 2  # one line per epoch, not one per rank


def test_preempted_ranks_resume_from_one_checkpoint_bit_identically(tiny_data, teacher_weights,
                                                                     tmp_path, two_epoch_run):
    save, _ = two_epoch_run
    args = train_args(tiny_data, teacher_weights, tmp_path, epochs=2)
    launcher = subprocess.Popen(torchrun_command(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in launcher.stdout:  # preempt in the second epoch, as a cluster scheduler would
        if line.startswith("Epoch: [1]"):
            launcher.send_signal(signal.SIGTERM)
            break
    output = launcher.stdout.read()
    assert launcher.wait() != 0
    assert "stopped by SIGTERM at epoch 1" in output
    resumed = torchrun(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    expected = torch.load(save / run_folder.LAST, weights_only=True)["state_dict"]
    actual = torch.load(tmp_path / run_folder.LAST, weights_only=True)["state_dict"]
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_global_batch_must_divide_among_processes(tiny_data, teacher_weights, tmp_path):
    result = torchrun(*train_args(tiny_data, teacher_weights, tmp_path, batch_size=9))
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch_size 9 (the global batch) does not divide among 2 processes: "
                      "use a multiple of 2"]
