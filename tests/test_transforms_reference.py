"""The data pipeline's images against references written here from the recipe's formulas.

Training sample, in this order:
  1. RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)): a box drawn by torchvision's
     documented procedure, cut out of the image and resized to size x size, bilinear (PIL).
  2. AlexNet PCA lighting: shift = eigvec @ (alpha * eigval), alpha ~ N(0, 0.1^2) per image, added
     to the uint8 pixels in float64, clipped to [0, 255] and truncated back to uint8.
  3. Horizontal flip with probability 1/2.
  4. x / 255, then (x - mean) / std per channel (ImageNet statistics).
Validation sample: the shorter side resized to round(size / 0.875) (bilinear), the centre
size x size crop, then step 4.

Only the first two functions below know the repository's data API and the order in which the
pipeline draws its random numbers; the references and the tests use nothing else from it.
"""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

# --- The pipeline under test: the only code that touches the repository's data API ---


def pipeline_epoch(root, split, image_size, seed, epoch, batch_size):
    """What the repository's data pipeline yields for one epoch of ``split``.

    Returns:
        ``(images, targets, samples)``: the normalised float images of all batches, concatenated
        in loader order, their labels, and per image ``(path, sample_seed)``, the file and the
        seed its augmentation ran under.
    """
    from models import RunSpec
    from utils.data import SeededSampler, make_loader, open_split
    train = split == "train"
    dataset = open_split(root, split, RunSpec(image_size=image_size))
    sampler = SeededSampler(len(dataset), seed, shuffle=train)
    sampler.set_epoch(epoch)
    order = list(sampler)  # (index, sample seed), in the order the loader reads them
    loader = make_loader(dataset, sampler, batch_size, 0, False)
    batches = [(batch.to_device(torch.device("cpu")), batch.target) for batch in loader]
    assert all(len(images) <= batch_size for images, _ in batches)
    images = torch.cat([images for images, _ in batches])
    targets = torch.cat([targets for _, targets in batches])
    return images, targets, [(dataset.samples[index][0], sample_seed) for index, sample_seed in order]


def pipeline_draws(sample_seed, width, height):
    """The random numbers of one training sample, drawn as the pipeline draws them: from torch's
    generator seeded with the sample's seed, the crop box, then lighting's alpha, then the flip."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(sample_seed)
        box = random_resized_crop_box(width, height)
        alpha = torch.randn(3, dtype=torch.float64) * 0.1
        flip = torch.rand(1).item() < 0.5
    return box, alpha.numpy(), flip


# --- References, from the formulas ---

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
EIGVAL = np.array([0.2175, 0.0188, 0.0045])
EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                   [-0.5808, -0.0045, -0.8140],
                   [-0.5836, -0.6948, 0.4203]])
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def random_resized_crop_box(width, height):
    """``(top, left, h, w)``: torchvision's RandomResizedCrop procedure on torch's generator.

    Up to 10 tries: an area share uniform in SCALE, a log-uniform aspect ratio in RATIO, the box
    sides rounded; the first box that fits gets a uniform position. If none fits, the whole image
    clamped to the nearest allowed ratio, centred.
    """
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*SCALE).item()
        aspect = torch.exp(torch.empty(1).uniform_(*log_ratio)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,)).item()
            left = torch.randint(0, width - w + 1, size=(1,)).item()
            return top, left, h, w
    if width / height < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif width / height > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def read_rgb(path):
    with Image.open(path) as f:
        return np.asarray(f.convert("RGB"))


def crop_and_resize(pixels, box, size):
    """The box cut out of an (H, W, 3) uint8 array, resized to size x size by PIL's bilinear filter."""
    top, left, h, w = box
    cut = Image.fromarray(np.ascontiguousarray(pixels[top:top + h, left:left + w]))
    return np.asarray(cut.resize((size, size), Image.BILINEAR))


def pca_lighting(pixels, alpha):
    shift = EIGVEC @ (alpha * EIGVAL)  # one value per RGB channel
    return np.clip(pixels.astype(np.float64) + shift, 0, 255).astype(np.uint8)  # astype truncates


def horizontal_flip(pixels):
    return pixels[:, ::-1]


def normalise(pixels):
    """(H, W, 3) uint8 -> (3, H, W) float64: x / 255, then (x - mean) / std."""
    x = pixels.astype(np.float64) / 255
    return torch.from_numpy(((x - MEAN) / STD).transpose(2, 0, 1).copy())


def reference_train_sample(path, size, box, alpha, flip):
    pixels = pca_lighting(crop_and_resize(read_rgb(path), box, size), alpha)
    return normalise(horizontal_flip(pixels) if flip else pixels)


def reference_val_sample(path, size):
    pixels = read_rgb(path)
    height, width = pixels.shape[:2]
    short = round(size / 0.875)  # 256 for 224
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return normalise(resized[top:top + size, left:left + size])


def label_of(path):
    """The index of the file's class folder among the sorted class folders."""
    class_folder = os.path.dirname(path)
    return sorted(os.listdir(os.path.dirname(class_folder))).index(os.path.basename(class_folder))


# --- A dataset whose every pixel is distinct noise, in several shapes ---

SIZE = 32
# (height, width): portrait, landscape, square, and one too elongated for any drawn box to fit
# (every try fails, so the crop takes the fallback).
SHAPES = [(40, 36), (30, 50), (33, 33), (10, 200)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k, name in enumerate(["b_class", "a_class", "c_class"]):  # labels follow sorted names
            os.makedirs(root / split / name)
            for i, (height, width) in enumerate(SHAPES[k:] + SHAPES[:k]):
                pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return str(root)


def max_difference(images, references):
    return (images.double() - torch.stack(references)).abs().max().item()


# --- The references, checked on cases worked out by hand ---

def test_lighting_shifts_every_channel_the_same_way_and_truncates():
    pixels = np.array([[[0, 0, 0], [1, 128, 255]]], dtype=np.uint8)
    # alpha (1, 0, 0): shift = 0.2175 * first eigenvector, negative in every channel.
    darker = pca_lighting(pixels, np.array([1.0, 0, 0]))
    assert darker.tolist() == [[[0, 0, 0], [0, 127, 254]]]
    # Its opposite raises every channel by less than one grey level: truncation keeps the values.
    assert pca_lighting(pixels, np.array([-1.0, 0, 0])).tolist() == pixels.tolist()
    # Mixed signs: (0, 1, 0) shifts by 0.0188 * (0.7192, -0.0045, -0.6948): R stays, G and B drop.
    assert pca_lighting(pixels, np.array([0, 1.0, 0])).tolist() == [[[0, 0, 0], [1, 127, 254]]]


def test_normalisation_and_flip_by_hand():
    pixels = np.array([[[0, 255, 124], [255, 0, 124]]], dtype=np.uint8)
    x = normalise(horizontal_flip(pixels))
    assert x.shape == (3, 1, 2)
    assert x[0].flatten().tolist() == pytest.approx([(1 - 0.485) / 0.229, -0.485 / 0.229])
    assert x[1].flatten().tolist() == pytest.approx([-0.456 / 0.224, (1 - 0.456) / 0.224])
    assert x[2].flatten().tolist() == pytest.approx([(124 / 255 - 0.406) / 0.225] * 2)


def test_crop_box_follows_the_scale_and_ratio_ranges():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        boxes = [random_resized_crop_box(36, 40) for _ in range(500)]
        # Nothing fits a 10 x 200 image: the fallback crops the widest 4:3 box, centred.
        assert random_resized_crop_box(200, 10) == (0, 93, 10, 13)
    for top, left, h, w in boxes:
        assert 0 <= top <= 40 - h and 0 <= left <= 36 - w
        assert 0.08 * 0.8 <= h * w / (36 * 40) <= 1 and 3 / 4 * 0.8 <= w / h <= 4 / 3 * 1.25
    assert len(set(boxes)) > 400


# --- The pipeline against the references ---

@pytest.mark.parametrize("epoch", [0, 1])
def test_training_images_equal_the_reference(data, epoch):
    images, targets, samples = pipeline_epoch(data, "train", SIZE, seed=3, epoch=epoch, batch_size=5)
    assert images.shape == (len(SHAPES) * 3, 3, SIZE, SIZE) and images.dtype == torch.float32
    references, flips, shifts_down = [], set(), set()
    for path, sample_seed in samples:
        height, width = read_rgb(path).shape[:2]
        box, alpha, flip = pipeline_draws(sample_seed, width, height)
        references.append(reference_train_sample(path, SIZE, box, alpha, flip))
        flips.add(flip)
        shifts_down.update(EIGVEC @ (alpha * EIGVAL) < 0)
    assert flips == {True, False} and shifts_down == {True, False}  # every branch is exercised
    assert targets.tolist() == [label_of(path) for path, _ in samples]
    assert max_difference(images, references) < 1e-5


def test_augmentation_depends_on_seed_and_epoch_not_on_batch_size(data):
    def by_path(seed, epoch, batch_size):
        images, _, samples = pipeline_epoch(data, "train", SIZE, seed, epoch, batch_size)
        return {path: image for (path, _), image in zip(samples, images)}

    first = by_path(3, 0, 5)
    again = by_path(3, 0, 4)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[path], again[path]) for path in first)
    # Images with a drawn crop box (not the 10 x 200 ones, whose fallback box is fixed) differ.
    drawn = [path for path in first if read_rgb(path).shape[:2] != (10, 200)]
    assert len(drawn) == 9
    for other in (by_path(3, 1, 5), by_path(4, 0, 5)):
        assert not any(torch.equal(first[path], other[path]) for path in drawn)


def test_validation_images_equal_the_reference(data):
    images, targets, samples = pipeline_epoch(data, "val", SIZE, seed=3, epoch=0, batch_size=5)
    paths = [path for path, _ in samples]
    assert paths == sorted(paths)  # in folder order, unshuffled
    assert targets.tolist() == [label_of(path) for path in paths]
    assert max_difference(images, [reference_val_sample(path, SIZE) for path in paths]) < 1e-5
