"""A folder of JPEG files shaped like ImageNet's, for measuring data loading without ImageNet."""
import concurrent.futures
import os

import numpy as np
from PIL import Image


def write_jpeg_folder(root, count, seed=0, classes=10, processes=None):
    """``count`` JPEG files of ImageNet's typical size (400-500 x 300-375 pixels, about 80 KB at
    quality 90) in ``classes`` folders, written by ``processes`` processes (default: every CPU).
    Returns ``root``."""
    for k in range(classes):
        os.makedirs(os.path.join(root, f"class_{k}"), exist_ok=True)
    jobs = [(os.path.join(root, f"class_{i % classes}", f"{i}.jpg"), seed, i) for i in range(count)]
    with concurrent.futures.ProcessPoolExecutor(processes) as pool:
        list(pool.map(write_jpeg, *zip(*jobs), chunksize=16))
    return root


def write_jpeg(path, seed, index):
    rng = np.random.default_rng([seed, index])
    width, height = int(rng.integers(400, 501)), int(rng.integers(300, 376))
    # Upsampled coarse noise plus a little fine noise compresses like a photograph, so decoding
    # costs about what it costs on ImageNet.
    coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32)
    pixels += rng.normal(0, 20, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
