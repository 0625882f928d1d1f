"""The two halves of the data pipeline: what a worker does with one sample, and what the training
device does with a batch of them.

Backend ``pil``: a worker decodes the file with PIL, crops, resizes and flips it, and hands over
uint8 pixels. Backend ``gpu``: a worker reads the file's bytes and header only; the device decodes
the batch's JPEG files together, then crops, resizes and flips each. Files the device's decoder
cannot take (CMYK JPEGs, PNGs under a .JPEG name, truncated files) go the ``pil`` way in the
worker, and so does a share of the others chosen per sample (``--cpu_decode_share``), so that idle
workers take part of the decoding off the device. In both, lighting and normalisation run on the
device (``Batch.to_device``).
"""
import io
import os
import stat
import warnings
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from .augment import Augmentation, crop, draw_augmentation, lighten, normalise

BACKENDS = ("pil", "gpu")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
JPEG_END = b"\xff\xd9"
# Far above any photograph (ImageNet's largest JPEG is under 16 MB); a bigger "image" is read as
# unreadable instead of filling a worker's memory.
MAX_FILE_BYTES = 256 * 2**20


class UnreadableImage:
    """Stands in for a sample whose file could not be decoded."""

    def __init__(self, path, reason):
        self.path, self.reason = path, reason

    @classmethod
    def from_error(cls, path, error):
        return cls(path, f"{type(error).__name__}: {error}")


class Sample(NamedTuple):
    """One readable sample as a worker hands it over.

    Exactly one of ``pixels`` (decoded, cropped and flipped on the CPU: uint8 (S, S, 3)) and
    ``jpeg`` (the file's bytes as a uint8 tensor, for the device to decode) is set.
    """
    target: int
    path: str
    augmentation: Optional[Augmentation]  # None under the validation transform
    pixels: Optional[np.ndarray] = None
    jpeg: Optional[torch.Tensor] = None


def read_with_pil(path, target, spec, train):
    """Backend ``pil``: the sample decoded, cropped, resized and flipped on the CPU, as ``spec`` (the
    run's RunSpec) says."""
    with open_image(path)[1] as image:
        augmentation = draw_augmentation(image) if train else None
        return Sample(target, path, augmentation, pixels=pixels_with_pil(image, spec, augmentation))


def read_for_device(path, target, spec, train, decode_with_pil=False):
    """Backend ``gpu``: the file's bytes and its augmentation, drawn from the header alone.

    A file the device cannot decode, or any file with ``decode_with_pil``, is decoded here
    instead, as the ``pil`` backend would.
    """
    data, header = open_image(path)
    augmentation = draw_augmentation(header) if train else None
    if not decode_with_pil and device_decodable(header, data):
        return Sample(target, path, augmentation, jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return Sample(target, path, augmentation, pixels=pixels_with_pil(header, spec, augmentation))


def open_image(path):
    """The bytes of the image file ``path`` and PIL's reading of its header, pixels undecoded.

    Both backends read files through here, so both refuse the same files: anything but a regular
    file (a FIFO or device would block or never end; it is opened without waiting for a writer and
    checked once open), a file over MAX_FILE_BYTES, and an image of more than PIL's
    ``Image.MAX_IMAGE_PIXELS`` pixels, judged from the header before any pixel is decoded (PIL
    alone would only warn up to twice that, and the device decoder does not check at all).

    Raises:
        OSError or Image.DecompressionBombError (both in READ_ERRORS).
    """
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        data = file.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"{path} is larger than {MAX_FILE_BYTES} bytes, too large for an image")
    header = Image.open(io.BytesIO(data))  # parses the header; the pixels stay undecoded
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and header.width * header.height > limit:
        raise Image.DecompressionBombError(
            f"{header.width}x{header.height} pixels, more than PIL's limit of {limit} "
            f"(Image.MAX_IMAGE_PIXELS)")
    return data, header


def pixels_with_pil(image, spec, augmentation):
    """An opened PIL image decoded to RGB and cropped: uint8 (S, S, 3), read-only."""
    return np.asarray(crop(image.convert("RGB"), spec, augmentation))


def device_decodable(header, data):
    """Whether a file is an 8-bit RGB or grayscale JPEG that ends with its end-of-image marker.

    A file that does not end so is most likely truncated: PIL's verdict on it, made here, keeps
    the count of unreadable files the same as under the ``pil`` backend.
    """
    return (header.format == "JPEG" and header.mode in ("RGB", "L") and header.bits == 8
            and data.endswith(JPEG_END))


class Batch:
    """The samples of a batch, on their way to the training device.

    Attributes:
        spec: the run's RunSpec, which says how images are cropped and normalised.
        target: int64 class indices of the readable samples.
        unreadable: an UnreadableImage per sample that was skipped.
        augmentations: each readable sample's Augmentation (None under the validation transform).
        on_device: for each readable sample, whether its JPEG is decoded on the device.
    """

    def __init__(self, samples, spec):
        readable = [s for s in samples if not isinstance(s, UnreadableImage)]
        self.unreadable = [s for s in samples if isinstance(s, UnreadableImage)]
        self.spec = spec
        self.target = torch.tensor([s.target for s in readable], dtype=torch.int64)
        self.paths = [s.path for s in readable]
        self.augmentations = [s.augmentation for s in readable]
        self.on_device = [s.jpeg is not None for s in readable]
        train = bool(readable) and readable[0].augmentation is not None
        self.shifts = torch.from_numpy(np.stack([a.shift for a in self.augmentations])) if train else None
        # One tensor each, so that a worker hands the batch over through two shared-memory blocks.
        pixels = [s.pixels for s in readable if s.jpeg is None]
        self.pixels = torch.from_numpy(np.stack(pixels)) if pixels else None  # (M, S, S, 3)
        jpegs = [s.jpeg for s in readable if s.jpeg is not None]
        self.jpeg_sizes = [len(jpeg) for jpeg in jpegs]
        self.jpegs = torch.cat(jpegs) if jpegs else None

    def __len__(self):
        return len(self.target)

    def pin_memory(self):
        """Pins the tensors that are copied to the device (DataLoader(pin_memory=True) calls this)."""
        for name in ("target", "shifts", "pixels"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.pin_memory())
        return self

    def to_device(self, device, channels_last=False):
        """The batch's images on ``device``, normalised float32 (N, 3, S, S), as the model takes them.

        A JPEG that neither the device nor PIL can decode is moved from the batch to
        ``unreadable`` here, so read ``target``, ``unreadable`` and ``len(batch)`` after this call.

        Returns:
            the images, or None when no image of the batch is readable.
        """
        images = self.decode(device)
        if images is None:
            return None
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = images.contiguous(memory_format=memory_format)
        if self.shifts is None:
            return normalise(images.float(), self.spec)
        return normalise(lighten(images, self.shifts.to(device, non_blocking=True)), self.spec)

    def decode(self, device):
        """The uint8 images (N, 3, S, S) on ``device``, cropped and flipped, before lighting."""
        from_cpu = None
        if self.pixels is not None:
            from_cpu = self.pixels.to(device, non_blocking=True).permute(0, 3, 1, 2)
        if self.jpegs is None:
            return from_cpu
        cpu_images = iter(() if from_cpu is None else from_cpu)
        device_images = iter(self.decode_jpegs(device))
        images = [next(device_images if on_device else cpu_images) for on_device in self.on_device]
        images = self.drop_unreadable(images)
        return torch.stack(images) if images else None

    def decode_jpegs(self, device):
        """Each JPEG of the batch decoded on ``device`` and cropped; PIL decodes any it fails on.

        Returns:
            per JPEG, a uint8 (3, S, S) tensor on ``device``, or an UnreadableImage.
        """
        jpegs = list(torch.split(self.jpegs, self.jpeg_sizes))
        samples = [k for k, on_device in enumerate(self.on_device) if on_device]
        return [self.crop_decoded(k, jpeg, image, device)
                for k, jpeg, image in zip(samples, jpegs, decode_on_device(jpegs, device))]

    def crop_decoded(self, k, jpeg, image, device):
        """Sample ``k`` cropped from its decoded ``image``, or from PIL's decoding where that is None."""
        augmentation = self.augmentations[k]
        if image is not None:
            return crop(image, self.spec, augmentation)
        try:
            pixels = pixels_with_pil(Image.open(io.BytesIO(jpeg.numpy())), self.spec, augmentation)
        except READ_ERRORS as error:
            return UnreadableImage.from_error(self.paths[k], error)
        return torch.tensor(pixels, device=device).permute(2, 0, 1)

    def drop_unreadable(self, images):
        """Moves the samples whose image is an UnreadableImage to ``unreadable``; returns the rest.

        Only JPEGs decoded here can turn out unreadable; their bytes go too, so a second call
        finds the batch as this one leaves it.
        """
        readable = [not isinstance(image, UnreadableImage) for image in images]
        if all(readable):
            return images
        self.unreadable += [image for image, ok in zip(images, readable) if not ok]
        jpegs_readable = [ok for ok, on_device in zip(readable, self.on_device) if on_device]
        jpegs = [jpeg for jpeg, ok in zip(torch.split(self.jpegs, self.jpeg_sizes), jpegs_readable) if ok]
        self.jpeg_sizes = [len(jpeg) for jpeg in jpegs]
        self.jpegs = torch.cat(jpegs) if jpegs else None
        self.target = self.target[readable]
        self.shifts = None if self.shifts is None else self.shifts[readable]
        for name in ("paths", "augmentations", "on_device"):
            setattr(self, name, [value for value, ok in zip(getattr(self, name), readable) if ok])
        return [image for image, ok in zip(images, readable) if ok]


def decode_on_device(jpegs, device):
    """Decodes JPEG files on ``device``, all in one call where none fails.

    Returns:
        per file, a uint8 (3, H, W) tensor on ``device``, or None where the file fails alone.
    """
    decoded = try_decode_jpeg(jpegs, device)
    if decoded is not None:
        return decoded
    return [None if image is None else image[0]
            for image in (try_decode_jpeg([jpeg], device) for jpeg in jpegs)]


# Whether each device decode first waits for the work already queued on the current stream. Only
# the hazard test (tests/test_cuda.py) turns it off, to show what the wait prevents.
DRAIN_BEFORE_DEVICE_DECODE = True


def try_decode_jpeg(jpegs, device):
    """torchvision's decode_jpeg on a list of files, or None if it fails."""
    if device.type == "cuda" and DRAIN_BEFORE_DEVICE_DECODE:
        # The decoder's outputs come from the caching allocator, which hands out a block freed on
        # the current stream at once, since later work on that stream runs after the work queued
        # before it. nvJPEG breaks that order: its hardware decode (Hopper) writes its outputs
        # before the work queued on the stream has run, and torchvision submits the decode on a
        # stream of its own that does not wait for the current one. Either way the decoder can
        # overwrite a block that queued kernels still read (the previous batch's crops, here).
        # Waiting for the current stream first, on the host, leaves no queued reader (a wait queued
        # on a stream would not do: the hardware decoder does not keep to stream order). In
        # training it is the decoding thread's own stream, so the training step does not wait.
        torch.cuda.current_stream(device).synchronize()
    with warnings.catch_warnings():
        # torchvision 0.29 marks its image codecs deprecated in favour of a separate package.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            return None
