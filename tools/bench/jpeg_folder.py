"""A folder of JPEG files shaped like ImageNet's, for measuring data loading without ImageNet."""
import os

import numpy as np
from PIL import Image


def write_jpeg_folder(root, count, seed=0, classes=10):
    """``count`` ImageNet-sized JPEG files (smooth random colour fields) in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        width, height = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        # Upsampled coarse noise plus a little fine noise compresses like a photograph, so decoding
        # costs about what it costs on ImageNet.
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32)
        pixels += rng.normal(0, 8, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i}.jpg"), quality=90)
