"""Process set-up that every entry point shares: seeding, the device's settings, mixed precision."""
import contextlib
import ctypes
import os
import random

import numpy as np
import torch


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def configure_device(device, deterministic=False):
    """On a GPU, cuDNN picks its fastest kernels, or with ``deterministic`` only kernels that give
    the same bits every run (and PyTorch refuses operations that have none); on a CPU, freed
    memory is kept for reuse. CPU kernels are deterministic already."""
    if device.type == "cuda":
        set_deterministic(deterministic)
    else:
        keep_freed_host_memory()


def set_deterministic(deterministic):
    """Deterministic GPU kernels (no cuDNN autotuning) if ``deterministic``, else the fastest."""
    if deterministic:
        # cuBLAS reads this when it creates its handle, at the first matrix product.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


# glibc mallopt options and the values set by keep_freed_host_memory.
MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 2**31 - 1), "M_TOP_PAD": (-2, 256 * 2**20),
                   "M_MMAP_THRESHOLD": (-3, 2**30)}


def keep_freed_host_memory():
    """Makes glibc's malloc keep freed memory for the next iteration instead of returning it.

    A CPU training iteration allocates and frees the same large tensors every time. By default
    glibc maps blocks of a few MB and more freshly from the system and gives freed heap back, so
    every iteration page-faults its working set in again (docs/speed.md gives the
    cost). The process's resident memory then stays at its peak. Numerics are untouched.

    Returns:
        True if every setting took; False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.values()])


def autocast(device, amp):
    """The autocast context of ``--amp`` (``none``, ``bf16`` or ``fp16``) on ``device``."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
