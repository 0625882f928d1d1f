"""What only a GPU can show: --deterministic training repeats itself bit for bit, also when the
data backend decodes on the GPU. Skipped without CUDA; tools/measure_gpu.sh runs it with the
CUDA tests of test_data_pipeline.py on a GPU machine."""
import os

import pytest
import torch

from conftest import run_script, train_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backend", ["pil", "gpu"])
def test_deterministic_training_repeats_bit_for_bit(tiny_data, teacher_weights, tmp_path, backend):
    states = []
    for name in ("first", "second"):
        save = tmp_path / name
        result = run_script("step1/train.py", *train_args(tiny_data, teacher_weights, save, epochs=2),
                            "--device", "cuda", "--deterministic", "--data_backend", backend)
        assert result.returncode == 0, result.stderr[-3000:]
        states.append(torch.load(os.path.join(save, "checkpoint.pth.tar"), weights_only=True)["state_dict"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
