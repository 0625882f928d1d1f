"""--data_backend gpu with part of the JPEG files left to PIL (--cpu_decode_share): a run killed inside
an epoch at a non-zero learning rate and rerun ends bit-identical to one that nothing interrupted. On
the CPU here, with torchcodec's decoder while torchvision's fails when called; on CUDA with
--deterministic and each decoder where a GPU is (tools/measure_gpu.sh runs it there). And training's
validation leaves the same files to PIL as evaluate.py."""
import json
import os
import re
import signal
import subprocess

import pytest
import torch

from conftest import evaluate_args, last_val_line, run_script, single_error_line, write_image_folder
from test_robustness import assert_resumed_to_the_uninterrupted_end, checkpoint, interrupted, step1_command
from utils import distributed
from utils.data import SeededSampler, decoded_by_pil
from utils.pipeline import JPEG_DECODERS
from utils.trainer import TrainingData
from models import RunSpec
from utils.recipe import ADAMBNN
from utils.training_flags import build_parser, fill_defaults

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
NEEDS_TORCHCODEC = pytest.mark.skipif(not JPEG_DECODERS["torchcodec"].load(), reason="torchcodec does not load")
# On PYTHONPATH, its sitecustomize.py makes torchvision.io.decode_jpeg fail when called.
WITHOUT_TORCHVISION_DECODER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                           "without_torchvision_decoder")


@pytest.fixture(scope="module")
def tiny_jpegs(tmp_path_factory):
    """tiny_data's images as JPEG files, which the gpu backend decodes on the device."""
    return write_image_folder(tmp_path_factory.mktemp("jpegs"), {"train": 8, "val": 4}, image_format="JPEG")


# jpeg_decoder "torchcodec": the default choice, with torchvision's decoder failing when called.
@pytest.mark.parametrize("device, backend, jpeg_decoder", [
    pytest.param("cpu", "gpu", "torchcodec", marks=[NEEDS_TORCHCODEC, pytest.mark.slow]),
    pytest.param("cuda", "pil", None, marks=NEEDS_CUDA),
    pytest.param("cuda", "gpu", "torchcodec", marks=[NEEDS_CUDA, NEEDS_TORCHCODEC]),
    pytest.param("cuda", "gpu", "torchvision", marks=NEEDS_CUDA)])
def test_killed_inside_an_epoch_then_rerun_ends_bit_identical(tiny_jpegs, teacher_weights, tmp_path, monkeypatch,
                                                              device, backend, jpeg_decoder):
    flags = ["--device", device, "--data_backend", backend, "--cpu_decode_share", 0.5,
             "--save_every_iters", 2]
    if device == "cuda":
        flags.append("--deterministic")
    if jpeg_decoder == "torchcodec":
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [WITHOUT_TORCHVISION_DECODER,
                                                                       os.environ.get("PYTHONPATH")])))
    elif jpeg_decoder:
        flags += ["--jpeg_decoder", jpeg_decoder]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    result = subprocess.run(step1_command(tiny_jpegs, teacher_weights, straight, *flags), check=True,
                            capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    uninterrupted = checkpoint(straight)
    assert uninterrupted["args"]["cpu_decode_share"] == 0.5
    assert uninterrupted["args"]["data_backend"] == backend
    with open(straight / "args.json") as f:
        assert json.load(f)["jpeg_decoder"] == uninterrupted["args"]["jpeg_decoder"] == jpeg_decoder
    if jpeg_decoder:
        assert re.search(rf"^=> JPEG files decoded on the device by {jpeg_decoder} \S+$", result.stdout, re.M)
    if jpeg_decoder == "torchcodec":
        assert_evaluate_decodes_with_torchcodec(tiny_jpegs, straight, result.stdout, device)

    command = step1_command(tiny_jpegs, teacher_weights, killed, *flags)
    # Killed in iteration 3 of epoch 0 (learning rate lr / 2), after its update and before the
    # checkpoint of iteration 4: the updates of iterations 2 and 3 are lost and redone.
    result = interrupted(command, "SIGKILL", after_step=4)
    assert result.returncode == -signal.SIGKILL, result.stdout[-2000:] + result.stderr[-2000:]
    saved = checkpoint(killed)
    assert (saved["epoch"], saved["iteration"]) == (0, 2)
    assert not torch.equal(saved["state_dict"]["fc.weight"], uninterrupted["state_dict"]["fc.weight"])
    assert_resumed_to_the_uninterrupted_end(command, (0, 2), uninterrupted, killed)


def assert_evaluate_decodes_with_torchcodec(data, run_folder, training_output, device):
    """evaluate.py with --data_backend gpu, while torchvision's decoder fails: the last checkpoint
    scores as training's last validation did, and naming torchvision's decoder is one error line."""
    flags = [*evaluate_args(data, run_folder / "checkpoint.pth.tar"), "--device", device,
             "--data_backend", "gpu", "--cpu_decode_share", 0.5]
    result = run_script("evaluate.py", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^=> JPEG files decoded on the device by torchcodec \S+$", result.stdout, re.M)
    assert last_val_line(result.stdout) == last_val_line(training_output)
    error = single_error_line(run_script("evaluate.py", *flags, "--jpeg_decoder", "torchvision"))
    assert error.startswith("error: the device's JPEG decoder torchvision ")
    assert "RuntimeError: torchvision.io.decode_jpeg was replaced by a function that fails" in error


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
