"""Imported at the start of every Python process that has this folder on PYTHONPATH
(tests/test_decode_resume.py): torchvision's decode_jpeg becomes a function that fails when called,
as if torchvision no longer had a working JPEG decoder, so a run that still decodes on the device
shows that it does so with torchcodec."""
import torchvision.io
import torchvision.io.image


def decode_jpeg(*args, **kwargs):
    raise RuntimeError("torchvision.io.decode_jpeg was replaced by a function that fails")


torchvision.io.decode_jpeg = torchvision.io.image.decode_jpeg = decode_jpeg
