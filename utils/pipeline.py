"""The two halves of the data pipeline: what a worker does with one sample, and what the training
device does with a batch of them.

Backend ``pil``: a worker decodes the file with PIL, crops, resizes and flips it, and hands over
uint8 pixels. Backend ``gpu``: a worker reads the file's bytes and header only; the device decodes
the batch's JPEG files together, with one of JPEG_DECODERS (torchcodec's, else torchvision's), then
crops, resizes and flips each. Files the device's decoder cannot take (CMYK JPEGs, PNGs under a
.JPEG name, truncated files, JPEGs with an EXIF orientation) go the ``pil`` way in the worker, and
so does a share of the others chosen per sample (``--cpu_decode_share``), so that idle workers take
part of the decoding off the device. In both, lighting and normalisation run on the device
(``Batch.to_device``).
"""
import functools
import io
import os
import stat
from typing import NamedTuple, Optional

import numpy as np
import torch
from PIL import Image

from .augment import Augmentation, crop, draw_augmentation, lighten, normalise
from .errors import UserError

BACKENDS = ("pil", "gpu")
READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112  # the EXIF tag; its value 1 means the pixels are stored as displayed
# Far above any photograph (ImageNet's largest JPEG is under 16 MB); a bigger "image" is read as
# unreadable instead of filling a worker's memory.
MAX_FILE_BYTES = 256 * 2**20
# The most pixels the geometric transform may make of one image: as many as PIL decodes by default
# (Image.MAX_IMAGE_PIXELS, 268 MB of RGB). The validation resize at the largest --image_size makes
# under a third of that of a 4:3 photograph.
MAX_RESIZED_PIXELS = 89_478_485


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
    ``jpeg`` (the file's bytes as a uint8 tensor, for the device to decode with ``jpeg_decoder``,
    a name in JPEG_DECODERS) is set.
    """
    target: int
    path: str
    augmentation: Optional[Augmentation]  # None under the validation transform
    pixels: Optional[np.ndarray] = None
    jpeg: Optional[torch.Tensor] = None
    jpeg_decoder: Optional[str] = None


def read_with_pil(path, target, spec, train):
    """Backend ``pil``: the sample decoded, cropped, resized and flipped on the CPU, as ``spec`` (the
    run's RunSpec) says."""
    with open_image(path)[1] as image:
        augmentation = draw_augmentation(image) if train else None
        require_resize_within_limit(image, spec, augmentation)
        return Sample(target, path, augmentation, pixels=pixels_with_pil(image, spec, augmentation))


def read_for_device(path, target, spec, train, jpeg_decoder, decode_with_pil=False):
    """Backend ``gpu``: the file's bytes and its augmentation, drawn from the header alone, for
    ``jpeg_decoder`` (a name in JPEG_DECODERS) to decode on the device.

    A file the device cannot decode, or any file with ``decode_with_pil``, is decoded here
    instead, as the ``pil`` backend would.
    """
    data, header = open_image(path)
    augmentation = draw_augmentation(header) if train else None
    require_resize_within_limit(header, spec, augmentation)
    if not decode_with_pil and device_decodable(header, data):
        return Sample(target, path, augmentation, jpeg=torch.frombuffer(bytearray(data), dtype=torch.uint8),
                      jpeg_decoder=jpeg_decoder)
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


def resized_pixels(width, height, spec, augmentation=None):
    """The pixels of the largest image the geometric transform (``utils.augment.crop``) makes from a
    ``width`` x ``height`` image: the validation resize's whole image (its shorter side to
    ``spec.resized_side()``, the longer one in proportion, as torchvision computes it), or for a
    training crop the larger of the two passes of its separable resize (``image_size`` by the
    box's longer side, then ``image_size`` squared)."""
    if augmentation is None:
        side = spec.resized_side()
        return side * int(side * max(width, height) / min(width, height))
    _, _, box_height, box_width = augmentation.box
    return spec.image_size * max(spec.image_size, box_height, box_width)


def require_resize_within_limit(header, spec, augmentation):
    """Refuses an image whose transform would make more than MAX_RESIZED_PIXELS pixels
    (``resized_pixels``): the header check of ``open_image`` bounds what is decoded, but a small
    image of an extreme aspect ratio (a 143-byte PNG of 20000x1 pixels) grows in the validation
    resize (to 5120000x256 at 224 px, 3.9 GB).

    Raises:
        Image.DecompressionBombError (in READ_ERRORS).
    """
    pixels = resized_pixels(header.width, header.height, spec, augmentation)
    if pixels > MAX_RESIZED_PIXELS:
        step = "validation resize" if augmentation is None else "training crop's resize"
        raise Image.DecompressionBombError(
            f"{header.width}x{header.height} pixels, of which the {step} at {spec.image_size} px would "
            f"make {pixels} pixels, more than the {MAX_RESIZED_PIXELS} allowed")


def pixels_with_pil(image, spec, augmentation):
    """An opened PIL image decoded to RGB and cropped: uint8 (S, S, 3), read-only."""
    return np.asarray(crop(image.convert("RGB"), spec, augmentation))


def device_decodable(header, data):
    """Whether a file is an 8-bit RGB or grayscale JPEG that ends with its end-of-image marker and
    asks for no EXIF orientation.

    A file that does not end so is most likely truncated: PIL's verdict on it, made here, keeps
    the count of unreadable files the same as under the ``pil`` backend. No backend applies an EXIF
    orientation (the published loader does not), but torchcodec's decoder always does: a file
    whose EXIF asks for a turn or a mirror, or whose EXIF cannot be read, goes to PIL.
    """
    return (header.format == "JPEG" and header.mode in ("RGB", "L") and header.bits == 8
            and data.endswith(JPEG_END) and exif_orientation(header) == 1)


def exif_orientation(header):
    """The EXIF orientation of an opened image: 1 (as stored) where it has none; None where its
    EXIF cannot be read."""
    try:
        return header.getexif().get(EXIF_ORIENTATION, 1)
    except READ_ERRORS:
        return None


class Batch:
    """The samples of a batch, on their way to the training device.

    Attributes:
        spec: the run's RunSpec, which says how images are cropped and normalised.
        target: int64 class indices of the readable samples.
        unreadable: an UnreadableImage per sample that was skipped.
        augmentations: each readable sample's Augmentation (None under the validation transform).
        on_device: for each readable sample, whether its JPEG is decoded on the device.
        jpeg_decoder: the name of the JPEG_DECODERS entry that decodes them; None without JPEGs.
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
        self.jpeg_decoder = next((s.jpeg_decoder for s in readable if s.jpeg is not None), None)

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
        """Each JPEG of the batch decoded on ``device`` and cropped; PIL decodes any that the
        decoder fails on alone.

        Returns:
            per JPEG, a uint8 (3, S, S) tensor on ``device``, or an UnreadableImage.

        Raises:
            UserError: the decoder failed on every JPEG of the batch and PIL reads one of them
                (where the batch has a single JPEG, only before the decoder has decoded any file).
        """
        decoder = JPEG_DECODERS[self.jpeg_decoder]
        jpegs = list(torch.split(self.jpegs, self.jpeg_sizes))
        samples = [k for k, on_device in enumerate(self.on_device) if on_device]
        decoded = decoder.decode(jpegs, device)
        images = [self.crop_decoded(k, jpeg, image, device) for k, jpeg, image in zip(samples, jpegs, decoded)]
        failures = [image for image in decoded if isinstance(image, DECODE_ERRORS)]
        if (len(failures) == len(jpegs) and (len(jpegs) > 1 or not decoder.has_decoded)
                and not all(isinstance(image, UnreadableImage) for image in images)):
            raise decoder.broken(failures[0], len(jpegs))
        return images

    def crop_decoded(self, k, jpeg, image, device):
        """Sample ``k`` cropped from its decoded ``image``, or decoded by PIL where that is the
        device decoder's error."""
        augmentation = self.augmentations[k]
        if not isinstance(image, DECODE_ERRORS):
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


# Whether each device decode first waits for the work already queued on the current stream. Only
# the hazard test (tests/test_cuda.py) turns it off, to show what the wait prevents.
DRAIN_BEFORE_DEVICE_DECODE = True
# What a decoder raises on a file it cannot take (or a library that does not work here); running out
# of device memory is not one of them.
DECODE_ERRORS = RuntimeError


class JpegDecoder:
    """A library that decodes a list of JPEG files on a device, imported when first used.

    Attributes:
        name: its ``--jpeg_decoder`` value, recorded in args.json.
        version: the library's version, once loaded.
        load_error: why it could not be imported, once that failed.
        has_decoded: whether it has decoded a file in this process; until then, a batch whose one
            file it fails on counts as a batch it fails on entirely.
    """

    def __init__(self, name, load):
        self.name, self.load_library = name, load
        self.decode_files = self.version = self.load_error = None
        self.has_decoded = False

    def load(self):
        """Imports the library once; returns whether it works here, keeping the reason if not."""
        if self.decode_files is None and self.load_error is None:
            try:
                self.decode_files, self.version = self.load_library()
            except (ImportError, OSError, RuntimeError) as error:
                self.load_error = one_line(error)
        return self.decode_files is not None

    def __str__(self):
        return f"{self.name} {self.version}"

    def decode(self, jpegs, device):
        """Decodes JPEG files on ``device``, all in one call where none fails.

        Returns:
            per file, a uint8 (3, H, W) RGB tensor on ``device``, or the error the decoder raised
            on that file alone.
        """
        images = self.try_decode(jpegs, device)
        if not isinstance(images, DECODE_ERRORS):
            return images
        return [image if isinstance(image, DECODE_ERRORS) else image[0]
                for image in (self.try_decode([jpeg], device) for jpeg in jpegs)]

    def try_decode(self, jpegs, device):
        """The decoded files, or the error the decoder raised on them."""
        if device.type == "cuda" and DRAIN_BEFORE_DEVICE_DECODE:
            # The decoder's outputs come from the caching allocator, which hands out a block freed
            # on the current stream at once, since later work on that stream runs after the work
            # queued before it. nvJPEG breaks that order: its hardware decode (Hopper) writes its
            # outputs before the work queued on the stream has run, and torchvision submits the
            # decode on a stream of its own that does not wait for the current one (torchcodec
            # decodes on the current stream and waits for it before a hardware decode, but the
            # wait stays for every decoder). Either way the decoder can overwrite a block that
            # queued kernels still read (the previous batch's crops, here). Waiting for the current
            # stream first, on the host, leaves no queued reader (a wait queued on a stream would
            # not do: the hardware decoder does not keep to stream order). In training it is the
            # decoding thread's own stream, so the training step does not wait.
            torch.cuda.current_stream(device).synchronize()
        try:
            images = self.decode_files(jpegs, device=device)
        except torch.cuda.OutOfMemoryError:
            raise
        except DECODE_ERRORS as error:
            return error
        self.has_decoded = True
        return images

    def broken(self, error, files):
        """The UserError for a decoder that failed on every one of ``files`` JPEG files of a batch
        that PIL reads, the first time with ``error``."""
        return UserError(f"the device's JPEG decoder {self} failed on all {files} JPEG files of a "
                         f"batch that PIL reads ({one_line(error)}), so it does not work here: "
                         f"install torchcodec for this torch and CUDA (see the data pipeline's "
                         f"docs), choose another with --jpeg_decoder, or use --data_backend pil")


def one_line(error):
    """An exception as one line of at most 300 characters: its type and message."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= 300 else text[:297] + "..."


# The JPEG decoders of backend ``gpu`` by name, in order of preference: the first that loads runs
# unless --jpeg_decoder names one. Each is registered as a function that imports the library and
# returns its ``decode(jpegs, device=...)`` (per file, a uint8 (3, H, W) RGB tensor on the device;
# DECODE_ERRORS on a file it cannot take) and its version, or raises ImportError, OSError or
# RuntimeError where the library is missing or cannot load.
JPEG_DECODERS = {}


def register_jpeg_decoder(name):
    """Decorator registering a decoder's loading function under ``name`` (see JPEG_DECODERS)."""
    def decorate(load):
        JPEG_DECODERS[name] = JpegDecoder(name, load)
        return load
    return decorate


@register_jpeg_decoder("torchcodec")
def load_torchcodec():
    """torchcodec's decode_jpeg: nvJPEG on CUDA, libjpeg-turbo on the CPU. It always applies an
    EXIF orientation (see ``device_decodable``)."""
    import torchcodec
    from torchcodec.decoders import decode_jpeg
    return functools.partial(decode_jpeg, mode="RGB"), torchcodec.__version__


@register_jpeg_decoder("torchvision")
def load_torchvision():
    """torchvision's decode_jpeg, deprecated since torchvision 0.29 in favour of torchcodec's: the
    fallback while it exists. It warns so at each call."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB), torchvision.__version__


def jpeg_decoder_for(backend, name=None):
    """The name of the JPEG decoder that ``backend`` runs: ``name``, or by default the first of
    JPEG_DECODERS that loads; None for backend ``pil``, which decodes with PIL alone.

    Raises:
        UserError: ``name`` given with backend ``pil``, or the decoder asked for (or every one)
            does not load.
    """
    if backend != "gpu":
        if name is not None:
            raise UserError(f"--jpeg_decoder {name} names the device's JPEG decoder, which only "
                            f"--data_backend gpu uses: drop it or pass --data_backend gpu")
        return None
    if name:
        decoder = JPEG_DECODERS[name]
        if not decoder.load():
            raise UserError(f"--jpeg_decoder {name} does not load here ({decoder.load_error}): install "
                            f"it, or leave --jpeg_decoder out to use the first of "
                            f"{', '.join(JPEG_DECODERS)} that loads")
        return name
    for decoder in JPEG_DECODERS.values():
        if decoder.load():
            return decoder.name
    reasons = "; ".join(f"{decoder.name}: {decoder.load_error}" for decoder in JPEG_DECODERS.values())
    raise UserError(f"--data_backend gpu decodes JPEG files on the device with one of "
                    f"{', '.join(JPEG_DECODERS)}, and none loads here ({reasons}): pip install "
                    f"torchcodec (see the data pipeline's docs), or use --data_backend pil")


def describe_jpeg_decoder(name):
    """What a run prints at its start about the decoder ``name`` (from ``jpeg_decoder_for``), with
    the preferred ones that do not load and why."""
    decoder = JPEG_DECODERS[name]
    skipped = [f"{other.name} does not load: {other.load_error}" for other in JPEG_DECODERS.values()
               if other.load_error is not None]
    return (f"=> JPEG files decoded on the device by {decoder}"
            + (f" ({'; '.join(skipped)})" if skipped else ""))
