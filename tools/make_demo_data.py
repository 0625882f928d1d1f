"""Writes a small synthetic image-classification dataset in ImageFolder layout, for the demo.

Each image holds one textured patch on a cluttered background; the class is the texture (plain,
horizontal stripes, checks, vertical stripes, dots, concentric rings; ``--classes K`` takes the first
K). The patch's place, size, outline, tilt, pattern scale and phase and every colour are random, so
the mean colour says nothing about the class, random crops can cut the patch and horizontal flips
keep the label. Every image is a function of ``(seed, split, class, index)``.

    python -m tools.make_demo_data --out demo_output/data --classes 6
"""
import os

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from utils.cli import OneLineErrorParser  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402

TEXTURES = ["plain", "hstripes", "checker", "vstripes", "dots", "rings"]
SPLITS = ["train", "val"]
SUPERSAMPLE = 2  # drawn at 2x and averaged down, which antialiases the edges
MIN_CONTRAST = 100  # RGB distance between a patch and its background, so every patch is visible
MAX_TILT = np.pi / 12  # stripes stay clearly horizontal or vertical


def rotated_frame(x, y, cx, cy, angle):
    """Coordinates of grid (x, y) in a frame centred at (cx, cy) and turned by ``angle``."""
    dx, dy = x - cx, y - cy
    return dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)


def texture_mask(texture, u, v, period):
    """Where ``texture`` takes the patch colour, at patch-frame coordinates (u, v).

    ``period`` is the pattern's repeat in pixels; ``plain`` is the patch colour everywhere.
    """
    row, col = np.floor(v / period), np.floor(u / period)
    if texture == "hstripes":
        return row % 2 == 0
    if texture == "vstripes":
        return col % 2 == 0
    if texture == "checker":
        return (row + col) % 2 == 0
    if texture == "dots":
        du, dv = u / period - col - 0.5, v / period - row - 0.5
        return du * du + dv * dv <= 0.3 ** 2
    if texture == "rings":
        return np.floor(np.sqrt(u * u + v * v) / period) % 2 == 0
    return np.ones_like(u, dtype=bool)


def random_colour(rng, away_from=None):
    """A uniform RGB colour, redrawn until it is MIN_CONTRAST away from ``away_from``."""
    while True:
        colour = rng.uniform(0, 255, size=3)
        if away_from is None or np.linalg.norm(colour - away_from) >= MIN_CONTRAST:
            return colour


def draw_image(texture, size, rng):
    """One ``size`` x ``size`` RGB uint8 image of a ``texture`` patch over clutter."""
    n = size * SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / SUPERSAMPLE

    # Background: a linear gradient between two colours along a random direction.
    c0, c1 = random_colour(rng), random_colour(rng)
    direction = rng.uniform(0, 2 * np.pi)
    t = ((x - size / 2) * np.cos(direction) + (y - size / 2) * np.sin(direction)) / size + 0.5
    image = c0 + np.clip(t, 0, 1)[..., None] * (c1 - c0)

    # Clutter: short thin bars and small dots in random colours, much smaller than the patch.
    for _ in range(rng.integers(4, 9)):
        cx, cy = rng.uniform(0, size, 2)
        if rng.random() < 0.5:
            length, width = rng.uniform(0.1, 0.3) * size, rng.uniform(0.02, 0.05) * size
            u, v = rotated_frame(x, y, cx, cy, rng.uniform(0, np.pi))
            mask = (np.abs(u) <= length / 2) & (np.abs(v) <= width / 2)
        else:
            mask = (x - cx) ** 2 + (y - cy) ** 2 <= (rng.uniform(0.02, 0.06) * size) ** 2
        image[mask] = random_colour(rng)

    # The patch: a disk or a square at a random place and scale, textured in a colour that stands
    # out from the background. Its outline says nothing about the class; its texture does.
    radius = rng.uniform(0.6, 0.8) * size
    cx, cy = rng.uniform(0.6 * radius, size - 0.6 * radius, 2)
    u, v = rotated_frame(x, y, cx, cy, rng.uniform(-MAX_TILT, MAX_TILT))
    if rng.random() < 0.5:
        inside = u * u + v * v <= radius ** 2
    else:
        inside = (np.abs(u) <= 0.85 * radius) & (np.abs(v) <= 0.85 * radius)
    phase = rng.uniform(0, 2, 2)  # in periods: where the pattern starts is random too
    period = rng.uniform(0.25, 0.35) * size
    mask = inside & texture_mask(texture, u + phase[0] * period, v + phase[1] * period, period)
    image[mask] = random_colour(rng, away_from=(c0 + c1) / 2)

    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    image += rng.normal(0, 6, image.shape)  # sensor-like noise
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dataset(out, classes, per_split, size, seed):
    """Writes ``out/<split>/<texture>/<index>.png`` for the first ``classes`` textures.

    Args:
        out: dataset root.
        classes: how many of TEXTURES to use.
        per_split: images per class for each split, e.g. ``{"train": 300, "val": 50}``.
        size: image side in pixels.
        seed: base seed; image ``i`` of class ``k`` in split ``s`` uses ``(seed, s, k, i)``, so
            adding images or classes keeps the existing ones unchanged.
    """
    for s, split in enumerate(SPLITS):
        for k, texture in enumerate(TEXTURES[:classes]):
            folder = os.path.join(out, split, texture)
            os.makedirs(folder, exist_ok=True)
            for i in range(per_split[split]):
                rng = np.random.default_rng([seed, s, k, i])
                Image.fromarray(draw_image(texture, size, rng)).save(os.path.join(folder, f"{i:05d}.png"))


def build_parser():
    parser = OneLineErrorParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="dataset root to write train/ and val/ into")
    parser.add_argument("--classes", type=int, default=len(TEXTURES),
                        help=f"number of classes, taken in order from {', '.join(TEXTURES)} "
                             f"(default {len(TEXTURES)})")
    parser.add_argument("--train_per_class", type=int, default=300, help="training images per class")
    parser.add_argument("--val_per_class", type=int, default=50, help="validation images per class")
    parser.add_argument("--size", type=int, default=40, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same images")
    return parser


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    if not 2 <= args.classes <= len(TEXTURES):
        raise UserError(f"--classes must be between 2 and {len(TEXTURES)}, got {args.classes}")
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
