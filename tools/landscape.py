"""Loss landscape of a checkpoint (of the architecture it names), as in Li et al. 2018 ("Visualizing
the Loss Landscape of Neural Nets") and the AdamBNN paper's figure 1.

The weights move along one or two random Gaussian directions, each filter-normalised: every filter
(output channel of a conv, output row of fc) of a direction is rescaled to the norm of the same
filter of the checkpoint's weights, so the plot does not depend on the scale of each layer. BatchNorm
parameters, biases (also the learnable biases of RSign and RPReLU, stored 4-D but one value per
channel) and PReLU slopes do not move, as in Li et al. For a step-2 checkpoint the directions move
the latent weights, so the loss is that of the binary network they binarize to.

The loss is the cross-entropy against the true labels on the first --batches batches of a seeded
shuffle of DATA/train, read with the deterministic validation transform of the checkpoint's run
(its image size, resize, crop and normalisation) and kept in memory, with BatchNorm in eval mode.
The centre of the grid is the checkpoint itself.

    python -m tools.landscape --checkpoint step2/models/model_best.pth.tar --data /imagenet \\
        --out landscape/step2 --dim 2 --points 21 --span 1

Writes OUT/landscape.npz (x, y for --dim 2, losses with losses[i, j] at (x[i], y[j]), and the run's
settings) and OUT/landscape.png (a line for --dim 1; a contour plot and a surface for --dim 2).
"""
import argparse
import itertools
import os
import tempfile
import time

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.cli import (OneLineErrorParser, add_device_flag, add_spec_flags, add_workers_flag,  # noqa: E402
                       model_for, require_count, require_image_size_in_memory, require_positive, require_seed,
                       resolve_device, resolve_workers)
from utils.data import SeededSampler, make_loader, on_device, open_split  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (ours or released)")
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/")
    parser.add_argument("--out", required=True, help="folder for landscape.npz and landscape.png")
    parser.add_argument("--dim", type=int, choices=[1, 2], default=2, help="number of directions")
    parser.add_argument("--points", type=int, default=21,
                        help="grid points per direction, odd so that 0 is one of them")
    parser.add_argument("--span", type=float, default=1.0, help="coordinates run over [-span, span]")
    parser.add_argument("--batches", type=int, default=10, help="training batches the loss is taken on")
    parser.add_argument("--batch_size", type=int, default=256, help="images per training batch")
    add_workers_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="fixes the directions and which images are used")
    add_device_flag(parser)
    add_spec_flags(parser, ("step", "image_size", "crop_pct", "resize_rounding", "interpolation", "mean", "std"))
    return parser


def check_args(args):
    """Raises a UserError for values no run can use."""
    if args.points < 3 or args.points % 2 == 0:
        raise UserError(f"--points must be odd and at least 3 so that the grid has 0 at its centre, "
                        f"got {args.points}")
    require_positive({"--span": args.span, "--batches": args.batches, "--batch_size": args.batch_size})
    require_count({"--points": args.points, "--batches": args.batches, "--batch_size": args.batch_size})
    if args.image_size is not None:
        require_image_size_in_memory(args.image_size)
    require_seed(args.seed)


def grid_coordinates(points, span):
    """``points`` evenly spaced values over ``[-span, span]`` whose middle one is exactly 0."""
    half = (points - 1) // 2
    return span * np.arange(-half, half + 1) / half


def moved_parameters(model):
    """(name, parameter) of the weights the directions move: those of every conv and linear layer."""
    layers = (m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    weights = {id(m.weight) for m in layers}
    return [(name, p) for name, p in model.named_parameters() if id(p) in weights]


def random_direction(model, generator):
    """A Gaussian direction with filter normalisation.

    Args:
        model: the network at the centre of the landscape.
        generator: a CPU ``torch.Generator``; it alone fixes the direction.

    Returns:
        A dict from parameter name to a tensor of that parameter's shape, for the parameters of
        ``moved_parameters``; every other parameter has a zero direction and is left out.
    """
    direction = {}
    for name, weight in moved_parameters(model):
        gaussian = torch.randn(weight.shape, generator=generator).to(weight.device, weight.dtype)
        direction[name] = filter_normalise(gaussian, weight.detach())
    return direction


def filter_normalise(direction, weight):
    """Rescales each filter (slice along dim 0) of ``direction`` to the norm of that filter of ``weight``."""
    def filter_norms(t):
        return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))

    return direction * (filter_norms(weight) / filter_norms(direction))


def cache_batches(dataset, batches, batch_size, seed, workers, device):
    """Reads the first ``batches`` batches of a seeded shuffle of ``dataset`` onto ``device``.

    Returns:
        (list of (images, targets), number of unreadable images skipped).
    """
    loader = make_loader(dataset, SeededSampler(len(dataset), seed, shuffle=True), batch_size, workers,
                         device.type == "cuda")
    cached, skipped = [], 0
    for batch, images in itertools.islice(on_device(loader, device, ahead=False), batches):
        skipped += len(batch.unreadable)
        if images is not None:
            cached.append((images, batch.target.to(device)))
    if not cached:
        raise UserError("none of the selected training images could be read")
    return cached, skipped


@torch.no_grad()
def mean_loss(model, batches):
    """Cross-entropy against the true labels, averaged over every image of ``batches``."""
    total, count = 0.0, 0
    for images, targets in batches:
        total += F.cross_entropy(model(images), targets, reduction="sum").item()
        count += len(targets)
    return total / count


@torch.no_grad()
def loss_surface(model, batches, directions, coordinates):
    """The loss at every grid point ``centre + sum_k coordinates[k] * directions[k]``.

    Args:
        model: the network at the centre, in eval mode; its weights are restored on return.
        batches: the cached (images, targets) pairs.
        directions: one or two dicts from ``random_direction``.
        coordinates: one 1-D array of coordinates per direction.

    Returns:
        An array of shape ``(len(c) for c in coordinates)``.
    """
    params = dict(moved_parameters(model))
    centre = {name: p.detach().clone() for name, p in params.items()}
    grid = list(itertools.product(*[enumerate(c) for c in coordinates]))
    losses = np.empty([len(c) for c in coordinates])
    started = time.time()
    try:
        for done, point in enumerate(grid, 1):
            index = tuple(i for i, _ in point)
            for name, p in params.items():
                p.copy_(centre[name])
                for direction, (_, coordinate) in zip(directions, point):
                    p.add_(direction[name], alpha=float(coordinate))
            losses[index] = mean_loss(model, batches)
            if done % max(1, len(grid) // 20) == 0 or done == len(grid):
                where = ", ".join(f"{coordinate:+.3f}" for _, coordinate in point)
                print(f"[{done}/{len(grid)}] ({where}) loss {losses[index]:.4f} "
                      f"({time.time() - started:.0f}s)", flush=True)
    finally:
        for name, p in params.items():
            p.copy_(centre[name])
    return losses


def plot(path, coordinates, losses, title):
    """A line (one direction) or a contour plot beside a surface (two directions), saved as PNG."""
    if len(coordinates) == 1:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.plot(coordinates[0], losses, marker=".")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("loss")
    else:
        fig = plt.figure(figsize=(12, 5))
        x, y = np.meshgrid(*coordinates, indexing="ij")
        contour_ax = fig.add_subplot(1, 2, 1)
        contours = contour_ax.contour(x, y, losses, levels=20)
        contour_ax.clabel(contours, fontsize=7)
        contour_ax.plot(0, 0, "k+")
        contour_ax.set_xlabel("direction 1")
        contour_ax.set_ylabel("direction 2")
        surface_ax = fig.add_subplot(1, 2, 2, projection="3d")
        surface_ax.plot_surface(x, y, losses, cmap="viridis", linewidth=0)
        surface_ax.set_xlabel("direction 1")
        surface_ax.set_ylabel("direction 2")
        surface_ax.set_zlabel("loss")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_out_dir(path):
    """Creates ``--out`` and checks that files can be written there, before any loss is computed."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {path} is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"cannot write to --out {path} ({e.strerror}): pass a writable folder") from None


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    model = model_for(args)
    spec = model.spec
    model.to(device).eval()
    dataset = open_split(args.data, "train", spec, train=False, num_classes=spec.num_classes)
    make_out_dir(args.out)
    workers = resolve_workers(args.workers)
    batches, skipped = cache_batches(dataset, args.batches, args.batch_size, args.seed, workers, device)
    num_images = sum(len(targets) for _, targets in batches)
    print(f"=> landscape of {args.checkpoint} as step {spec.step} on {num_images} images of "
          f"{os.path.join(args.data, 'train')}" + (f" ({skipped} unreadable skipped)" if skipped else ""),
          flush=True)

    generator = torch.Generator().manual_seed(args.seed)
    directions = [random_direction(model, generator) for _ in range(args.dim)]
    coordinates = [grid_coordinates(args.points, args.span)] * args.dim
    losses = loss_surface(model, batches, directions, coordinates)

    axes = dict(zip(("x", "y"), coordinates))
    np.savez(os.path.join(args.out, "landscape.npz"), **axes, losses=losses,
             checkpoint=args.checkpoint, step=spec.step, dim=args.dim, points=args.points, span=args.span,
             seed=args.seed, batches=args.batches, batch_size=args.batch_size,
             image_size=spec.image_size, num_images=num_images)
    plot(os.path.join(args.out, "landscape.png"), coordinates, losses,
         f"{os.path.basename(args.checkpoint)} (step {spec.step}), {num_images} training images")
    print(f"=> wrote landscape.npz and landscape.png to {args.out}; loss at the centre "
          f"{losses[(args.points // 2,) * args.dim]:.4f}", flush=True)
    return losses


if __name__ == "__main__":
    main()
