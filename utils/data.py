"""ImageNet-style data: the published transforms, seeded sampling and tolerant image loading.

Every random choice of an epoch (the order of the samples and the augmentation of each sample) is a
function of ``(seed, epoch, position in the epoch)``. Nothing depends on which process or worker
handles a sample or on how many batches ran before, which is what makes an interrupted run resume
bit for bit, also in the middle of an epoch.
"""
import math
import os

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045])
IMAGENET_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]])


class Lighting:
    """AlexNet-style PCA lighting noise, applied to the uint8 image as the published code does.

    The RGB shift ``eigvec @ (eigval * a)``, ``a ~ N(0, alphastd^2)`` per image, is added to the
    pixel values, clipped to [0, 255] and truncated back to uint8. (At alphastd=0.1 the shift is a
    few hundredths of a grey level, so its visible effect is that truncation.)
    """

    def __init__(self, alphastd=0.1):
        self.alphastd = alphastd

    def __call__(self, img):
        if self.alphastd == 0:
            return img
        alpha = (torch.randn(3, dtype=torch.float64) * self.alphastd).float().numpy()
        shift = IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)
        pixels = np.asarray(img) + shift
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")

    def __repr__(self):
        return f"{type(self).__name__}(alphastd={self.alphastd})"


def train_transform(image_size=224):
    """RandomResizedCrop(0.08-1), PCA lighting, horizontal flip, ToTensor, ImageNet normalisation."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.08, 1.0)),
        Lighting(0.1),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def val_transform(image_size=224):
    """Resize(round(size / 0.875)) (256 for 224), CenterCrop(size), ToTensor, normalisation."""
    return transforms.Compose([
        transforms.Resize(round(image_size / 0.875)),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class UnreadableImage:
    """Stands in for a sample whose file could not be decoded."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason


class SeededImageFolder(datasets.ImageFolder):
    """An ImageFolder whose items are addressed as ``(index, seed)``.

    The transform runs under ``torch.manual_seed(seed)`` in a forked RNG, so a sample's
    augmentation is fixed by its seed alone. A file that cannot be decoded yields an
    UnreadableImage instead of raising, so one corrupt JPEG does not end a run.
    """

    def __getitem__(self, item):
        index, seed = item
        path, target = self.samples[index]
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return UnreadableImage(path, f"{type(e).__name__}: {e}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), target


def open_split(root, split, transform, class_to_idx=None, num_classes=None):
    """Opens ``root/split`` as a SeededImageFolder, or raises a UserError that says what is wrong.

    Args:
        class_to_idx: the classes another split uses; this split must have the same ones.
        num_classes: the classes a model predicts; this split must have that many.
    """
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"no '{split}' folder at {folder}: --data must hold {split}/<class>/<image> "
                        f"(an ImageFolder tree)")
    try:
        dataset = SeededImageFolder(folder, transform=transform)
    except FileNotFoundError as e:
        raise UserError(f"{folder} holds no images in class folders ({e}); expected "
                        f"{split}/<class>/<image>") from None
    if class_to_idx is not None and dataset.class_to_idx != class_to_idx:
        mine, theirs = set(dataset.class_to_idx), set(class_to_idx)
        only_here = sorted(mine - theirs)[:5]
        only_there = sorted(theirs - mine)[:5]
        raise UserError(f"the class folders of {folder} differ from train's: only in {split}: "
                        f"{only_here or 'none'}; only in train: {only_there or 'none'}; "
                        f"make both splits hold the same class folders")
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise UserError(f"the model predicts {num_classes} classes but {folder} has "
                        f"{len(dataset.classes)} class folders")
    return dataset


def mix_seed(*values):
    """A 63-bit seed mixed from integers (splitmix64 steps): cheap enough to call per sample."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & mask
        state ^= state >> 31
    return state >> 1


class SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)`` for this process's share of an epoch.

    Training (``shuffle=True``): a permutation drawn from ``(seed, epoch)``, padded by wrapping to a
    multiple of the world size, then rank ``r`` takes positions ``r, r + W, r + 2W, ...``, so the
    union of the ranks' k-th batches is the k-th batch of a single process with the global batch.
    Evaluation (``shuffle=False``): the dataset in order, split the same way without padding, so
    every sample is counted exactly once across ranks.

    ``start`` skips the first ``start`` samples of this rank's share (mid-epoch resume).
    """

    def __init__(self, size, seed=0, shuffle=True, rank=0, world_size=1):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.share_size() - self.start

    def share_size(self):
        if self.shuffle:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
            padded = math.ceil(self.size / self.world_size) * self.world_size
            order = (order * math.ceil(padded / self.size))[:padded]
        else:
            order = list(range(self.size))
        positions = range(self.rank, len(order), self.world_size)
        for position in list(positions)[self.start:]:
            yield order[position], mix_seed(self.seed, self.epoch, position)


def collate_readable(batch):
    """Stacks the readable samples; returns ``(images, targets, unreadable)``."""
    unreadable = [item for item in batch if isinstance(item, UnreadableImage)]
    readable = [item for item in batch if not isinstance(item, UnreadableImage)]
    if not readable:
        return None, None, unreadable
    images, targets = torch.utils.data.default_collate(readable)
    return images, targets, unreadable


def make_loader(dataset, sampler, batch_size, workers, pin_memory):
    """A DataLoader over a SeededSampler with persistent, prefetching workers."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=collate_readable, pin_memory=pin_memory, drop_last=False,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
