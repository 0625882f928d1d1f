"""--data_backend gpu with part of the JPEG files left to PIL (--cpu_decode_share): a run killed inside
an epoch at a non-zero learning rate and rerun ends bit-identical to one that nothing interrupted. On
the CPU here; on CUDA with --deterministic where a GPU is (tools/measure_gpu.sh runs it there). And
training's validation leaves the same files to PIL as evaluate.py."""
import os
import signal
import subprocess

import pytest
import torch

from conftest import write_image_folder
from test_robustness import assert_resumed_to_the_uninterrupted_end, checkpoint, interrupted, step1_command
from utils import distributed
from utils.data import SeededSampler, decoded_by_pil
from utils.trainer import TrainingData
from models import RunSpec
from utils.recipe import ADAMBNN
from utils.training_flags import build_parser, fill_defaults

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_jpegs(tmp_path_factory):
    """tiny_data's images as JPEG files, which the gpu backend decodes on the device."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), {"train": 8, "val": 4}, image_format="JPEG")


@pytest.mark.slow
@pytest.mark.parametrize("device, backend", [
    ("cpu", "gpu"),
    pytest.param("cuda", "pil", marks=NEEDS_CUDA),
    pytest.param("cuda", "gpu", marks=NEEDS_CUDA)])
def test_killed_inside_an_epoch_then_rerun_ends_bit_identical(tiny_jpegs, teacher_weights, tmp_path, device,
                                                              backend):
    flags = ["--device", device, "--data_backend", backend, "--cpu_decode_share", 0.5,
             "--save_every_iters", 2]
    if device == "cuda":
        flags.append("--deterministic")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(step1_command(tiny_jpegs, teacher_weights, straight, *flags), check=True,
                   capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    uninterrupted = checkpoint(straight)
    assert uninterrupted["args"]["cpu_decode_share"] == 0.5
    assert uninterrupted["args"]["data_backend"] == backend

    command = step1_command(tiny_jpegs, teacher_weights, killed, *flags)
    # Killed in iteration 3 of epoch 0 (learning rate lr / 2), after its update and before the
    # checkpoint of iteration 4: the updates of iterations 2 and 3 are lost and redone.
    result = interrupted(command, "SIGKILL", after_step=4)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-2000:]
    saved = checkpoint(killed)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)
    assert not torch.equal(saved["state_dict"]["fc.weight"], uninterrupted["state_dict"]["fc.weight"])
    assert_resumed_to_the_uninterrupted_end(command, (0, 2), uninterrupted, killed)


def test_training_validates_with_the_decoding_choices_of_evaluate_py(tiny_jpegs):
    flags = ["--data", tiny_jpegs, "--seed", "3", "--data_backend", "gpu", "--cpu_decode_share", "0.5",
             "-j", "0", "--device", "cpu"]
    args = fill_defaults(build_parser(1).parse_args(flags), ADAMBNN, 1)
    data = TrainingData(args, distributed.init("cpu"), RunSpec())
    size = len(data.val_set)
    assert data.val_set.cpu_decode_share == 0.5
    # evaluate.py's sampler, which has no seed flag; the run's seed would take other files to PIL.
    in_evaluate, with_the_run_seed = SeededSampler(size, shuffle=False), SeededSampler(size, 3, shuffle=False)
    assert list(data.val_sampler) == list(in_evaluate)
    choices = [[decoded_by_pil(seed, 0.5) for _, seed in sampler]
               for sampler in (in_evaluate, with_the_run_seed)]
    assert choices[0] != choices[1]
