"""What only a GPU can show: no device JPEG decoder writes into memory that work queued on its stream
still reads. Skipped without CUDA; tools/measure_gpu.sh runs it, with the CUDA tests of
test_data_pipeline.py and test_decode_resume.py, and runs this file as a script to see what happens
without the guard (utils/pipeline.py, DRAIN_BEFORE_DEVICE_DECODE):

    python tests/test_cuda.py   # per decoder and kind of JPEG, guard on and off: iterations corrupted
"""
import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils import pipeline  # noqa: E402
from utils.pipeline import JPEG_DECODERS  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DECODERS = [pytest.param(name, marks=pytest.mark.skipif(not decoder.load(), reason=f"{name} does not load"))
            for name, decoder in JPEG_DECODERS.items()]

ITERATIONS = 100
SIDE = 256
FREED = 8  # blocks of one decoded image's size (3 x SIDE x SIDE bytes), freed before each decode
QUEUED_CYCLES = 50_000_000  # GPU clock cycles of work queued before the reductions (about 25 ms)


def jpeg_files(progressive):
    """Two SIDE x SIDE RGB JPEG files: baseline ones take nvJPEG's hardware path on Hopper,
    progressive ones its software path."""
    rng = np.random.default_rng(0)
    files = []
    for _ in range(2):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)).save(
            buffer, "JPEG", quality=90, progressive=progressive)
        files.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    return files


def decode_hazard(decoder, files, device, iterations=ITERATIONS):
    """Builds the hazard ``iterations`` times for the JpegDecoder ``decoder`` on a side stream, as
    training's decoding thread runs.

    Each time: tensors filled with known values; long work queued, then one reduction per tensor;
    the tensors freed while their reductions are still queued; the files decoded. A reduction that
    comes out wrong read memory the decoder wrote before the reduction ran.

    Returns:
        (iterations in which the decoder got one of the freed blocks, iterations corrupted).
    """
    stream = torch.cuda.Stream(device)
    expected = [(k + 1) * 3 * SIDE * SIDE for k in range(FREED)]
    handed = corrupted = 0
    with torch.cuda.stream(stream):
        decoder.decode(files, device)  # the decoder's one-off set-up, outside the count
        for _ in range(iterations):
            tensors = [torch.full((3 * SIDE * SIDE,), k + 1, dtype=torch.uint8, device=device)
                       for k in range(FREED)]
            stream.synchronize()
            torch.cuda._sleep(QUEUED_CYCLES)
            sums = [tensor.sum() for tensor in tensors]
            freed = {tensor.data_ptr() for tensor in tensors}
            del tensors
            images = decoder.decode(files, device)
            handed += any(image.data_ptr() in freed for image in images)
            stream.synchronize()
            corrupted += [value.item() for value in sums] != expected
    return handed, corrupted


@pytest.mark.parametrize("jpeg_decoder", DECODERS)
@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_device_decode_never_overwrites_memory_that_queued_work_reads(progressive, jpeg_decoder):
    assert pipeline.DRAIN_BEFORE_DEVICE_DECODE
    handed, corrupted = decode_hazard(JPEG_DECODERS[jpeg_decoder], jpeg_files(progressive), torch.device("cuda"))
    print(f"{jpeg_decoder}: decoder handed a freed block in {handed}/{ITERATIONS} iterations, "
          f"corrupted {corrupted}")
    # Without a freed block handed to the decoder there is no hazard, and no pass to report.
    assert handed > 0
    assert corrupted == 0


if __name__ == "__main__":
    cuda = torch.device("cuda")
    print(torch.cuda.get_device_name(cuda), "torch", torch.__version__)
    for decoder in JPEG_DECODERS.values():
        if not decoder.load():
            print(f"{decoder.name} does not load: {decoder.load_error}", flush=True)
            continue
        for progressive in (False, True):
            for guard in (True, False):
                pipeline.DRAIN_BEFORE_DEVICE_DECODE = guard
                handed, corrupted = decode_hazard(decoder, jpeg_files(progressive), cuda)
                print(f"{decoder}, {'progressive' if progressive else 'baseline'} JPEG, guard "
                      f"{'on' if guard else 'off'}: decoder handed a freed block in {handed}/{ITERATIONS} "
                      f"iterations, reductions corrupted in {corrupted}/{ITERATIONS}", flush=True)
