"""The published transforms, split where the work is cheapest to do.

Training: RandomResizedCrop(size, scale=(0.08, 1)), PCA lighting on the uint8 image, horizontal
flip, ToTensor, Normalize. Validation: Resize(round(size / crop_pct)), CenterCrop(size), ToTensor,
Normalize. The size, ``crop_pct`` and its rounding, the interpolation of both resizes and the normalisation's mean
and std are the run's (its RunSpec, models/spec.py); by default the published ones (224, 0.875,
bilinear, ImageNet's). The geometric steps (``crop``) run on a PIL image in a worker, or on a
decoded uint8 tensor on the training device; lighting and normalisation (``lighten``,
``normalise``) run on the device, on the whole batch. Each step does the same floating-point
operations as the published code, so the batch that reaches the model is bit for bit the same.
"""
import functools
from typing import NamedTuple

import numpy as np
import torch
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]])
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
LIGHTING_STD = 0.1


class Augmentation(NamedTuple):
    """The random choices made for one training sample.

    Attributes:
        box: ``(top, left, height, width)`` of the crop in the source image.
        shift: float64 array of 3, the lighting noise added to each RGB channel, in grey levels.
        flip: whether the crop is mirrored left to right.
    """
    box: tuple
    shift: np.ndarray
    flip: bool


def draw_augmentation(image):
    """Draws a training sample's crop, lighting and flip from torch's global RNG.

    The draws are those of the published transforms, in their order (crop, lighting, flip), so
    a seed gives the same augmentation as before. Only the image's size is read, so a lazily
    opened PIL image whose pixels were never decoded will do.
    """
    box = tuple(transforms.RandomResizedCrop.get_params(image, CROP_SCALE, CROP_RATIO))
    alpha = (torch.randn(3, dtype=torch.float64) * LIGHTING_STD).float().numpy()
    shift = IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)
    flip = bool(torch.rand(1) < 0.5)
    return Augmentation(box, shift, flip)


def crop(image, spec, augmentation=None):
    """The geometric transforms: a ``spec.image_size`` square crop, resized with antialiasing by
    ``spec.interpolation``.

    Args:
        image: a PIL RGB image, or a uint8 (3, H, W) tensor.
        spec: the run's RunSpec.
        augmentation: a training sample's Augmentation (crop box, then flip); None for the
            validation transform (shorter side to ``spec.resized_side()``, centre crop).
    """
    size, interpolation = spec.image_size, InterpolationMode(spec.interpolation)
    if augmentation is None:
        resized = F.resize(image, spec.resized_side(), interpolation, antialias=True)
        return F.center_crop(resized, size)
    cropped = F.resized_crop(image, *augmentation.box, [size, size], interpolation, antialias=True)
    return F.hflip(cropped) if augmentation.flip else cropped


def lighten(images, shifts):
    """Adds each image's lighting shift to uint8 ``images`` (N, 3, H, W); float32 grey levels.

    The published code adds the shift to the uint8 pixels in float64, clips to [0, 255] and
    truncates to uint8. Float32 would round ``pixel + shift`` differently next to integers, so
    this stays in float64; the result is whole numbers, exact in float32. (At alphastd 0.1 the
    shift is a few hundredths of a grey level, so its visible effect is that truncation.)
    """
    shifted = images.double() + shifts.view(-1, 3, 1, 1)
    return shifted.clamp_(0, 255).floor_().float()


def normalise(levels, spec):
    """ToTensor's ``/ 255`` and Normalize's ``(x - mean) / std`` (``spec``'s) on float32 grey
    levels, in place."""
    scale, mean, std = normalisation_constants(levels.device, spec.mean, spec.std)
    return levels.div_(scale).sub_(mean).div_(std)


@functools.lru_cache(maxsize=None)
def normalisation_constants(device, mean, std):
    """255, ``mean`` and ``std`` as float32 tensors on ``device``.

    On CUDA, dividing by a Python number is done as multiplying by its reciprocal, which can
    differ from the CPU's true division in the last bit; dividing by a tensor on the device is a
    true division everywhere.
    """
    def as_channels(values):
        return torch.tensor(values, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    scale = torch.tensor(255.0, dtype=torch.float32, device=device)
    return scale, as_channels(mean), as_channels(std)
