"""Writes a small synthetic image-classification dataset in ImageFolder layout, for the demo.

Each image holds one object on a cluttered background; the class is the object's shape (disk,
ring, square, triangle, cross) or the orientation of its stripes. Position, size, rotation and
every colour are random, so the mean colour says nothing about the class, crops can cut the
object and flips keep the label. Every image is a function of ``(seed, split, class, index)``.

    python utils/make_demo_data.py --out demo_output/data --classes 6
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.config import OneLineErrorParser  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402

SHAPES = ["disk", "ring", "hstripes", "vstripes", "triangle", "cross", "square"]
SPLITS = ["train", "val"]
SUPERSAMPLE = 2  # shapes are drawn at 2x and averaged down, which antialiases their edges
MIN_CONTRAST = 100  # RGB distance between an object and its background, so every object is visible


def rotated_frame(x, y, cx, cy, angle):
    """Coordinates of grid (x, y) in a frame centred at (cx, cy) and turned by ``angle``."""
    dx, dy = x - cx, y - cy
    return dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)


def shape_mask(shape, x, y, cx, cy, radius, angle):
    """Boolean mask of ``shape`` centred at (cx, cy) with outer radius ``radius``, on grid (x, y)."""
    u, v = rotated_frame(x, y, cx, cy, angle)
    r2 = u * u + v * v
    if shape == "disk":
        return r2 <= radius ** 2
    if shape == "ring":
        return (r2 <= radius ** 2) & (r2 >= (0.55 * radius) ** 2)
    if shape == "square":
        return (np.abs(u) <= 0.75 * radius) & (np.abs(v) <= 0.75 * radius)
    if shape == "triangle":
        # Inside all three edges of an equilateral triangle with circumradius ``radius``.
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= 0.5 * radius
        return inside
    if shape == "cross":
        arm = 0.3 * radius
        return (((np.abs(u) <= arm) & (np.abs(v) <= radius)) |
                ((np.abs(v) <= arm) & (np.abs(u) <= radius)))
    # Stripes: the class is their orientation in the image, so it ignores the rotation.
    period = 0.45 * radius
    across = y - cy if shape == "hstripes" else x - cx
    return (r2 <= radius ** 2) & (np.floor(across / period) % 2 == 0)


def random_colour(rng, away_from=None):
    """A uniform RGB colour, redrawn until it is MIN_CONTRAST away from ``away_from``."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if away_from is None or np.linalg.norm(colour - away_from) >= MIN_CONTRAST:
            return colour


def draw_image(shape, size, rng):
    """One ``size`` x ``size`` RGB uint8 image of ``shape`` over clutter."""
    n = size * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE

    # Background: a linear gradient between two colours along a random direction.
    c0, c1 = random_colour(rng), random_colour(rng)
    direction = rng.uniform(0, 2 * np.pi)
    t = ((x - size / 2) * np.cos(direction) + (y - size / 2) * np.sin(direction)) / size + 0.5
    image = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)

    # Clutter: short thin bars and small dots in random colours, much smaller than the object.
    for _ in range(rng.integers(4, 9)):
        cx, cy = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            length, width = rng.uniform(0.1, 0.3) * size, rng.uniform(0.02, 0.05) * size
            u, v = rotated_frame(x, y, cx, cy, rng.uniform(0, np.pi))
            mask = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
        else:
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= (rng.uniform(0.02, 0.06) * size) ** 2
        image[mask] = random_colour(rng)

    # The object, fully inside the image, in a colour that stands out from the background.
    radius = rng.uniform(0.2, 0.38) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    mask = shape_mask(shape, x, y, cx, cy, radius, rng.uniform(0, 2 * np.pi))
    image[mask] = random_colour(rng, away_from=(c0 + c1) / 2)

    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image += rng.normal(0, 6, image.shape)  # sensor-like noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dataset(out, classes, per_split, size, seed):
    """Writes ``out/<split>/<shape>/<index>.png`` for the first ``classes`` shapes.

    Args:
        out: dataset root.
        classes: how many of SHAPES to use.
        per_split: images per class for each split, e.g. ``{"train": 300, "val": 50}``.
        size: image side in pixels.
        seed: base seed; image ``i`` of class ``k`` in split ``s`` uses ``(seed, s, k, i)``, so
            adding images or classes keeps the existing ones unchanged.
    """
    for s, split in enumerate(SPLITS):
        for k, shape in enumerate(SHAPES[:classes]):
            folder = os.path.join(out, split, shape)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_split[split]):
                rng = np.random.default_rng([seed, s, k, i])
                Image.fromarray(draw_image(shape, size, rng)).save(os.path.join(folder, f"{i:05d}.png"))


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write train/ and val/ into")
    parser.add_argument("--classes", type=int, default=len(SHAPES),
                        help=f"number of classes, taken in order from {', '.join(SHAPES)} "
                             f"(default {len(SHAPES)})")
    parser.add_argument("--train_per_class", type=int, default=300, help="training images per class")
    parser.add_argument("--val_per_class", type=int, default=50, help="validation images per class")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images")
    return parser.parse_args(argv)


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    if not 2 <= args.classes <= len(SHAPES):
        raise UserError(f"--classes must be between 2 and {len(SHAPES)}, got {args.classes}")
    if args.train_per_class < 1 or args.val_per_class < 1:
        raise UserError("--train_per_class and --val_per_class must be at least 1")
    if args.size < 8:
        raise UserError(f"--size must be at least 8 pixels, got {args.size}")
    if os.path.isdir(args.out) and any(os.path.isdir(os.path.join(args.out, s)) for s in SPLITS):
        raise UserError(f"{args.out} already holds a dataset: remove it or pick another --out")
    try:
        write_dataset(args.out, args.classes,
                      {"train": args.train_per_class, "val": args.val_per_class}, args.size, args.seed)
    except OSError as e:
        raise UserError(f"cannot write to {args.out} ({e.strerror})") from None
    print(f"=> wrote {args.classes} classes x ({args.train_per_class} train + {args.val_per_class} val) "
          f"{args.size}x{args.size} images to {args.out} (chance: {100 / args.classes:.1f}%)")


if __name__ == "__main__":
    main()
