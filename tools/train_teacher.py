"""Trains a real-valued torchvision classifier with cross-entropy, to be the distillation teacher.

torchvision's pretrained teachers only predict the 1000 ImageNet classes; for any other dataset,
train one here first and pass the file to step 1 and step 2 as ``--teacher_weights`` (with the same
``--teacher`` architecture). Uses the same data pipeline as the steps: ImageFolder train/ and val/,
the published augmentation and the validation resize and centre crop.

    python -m tools.train_teacher --data /path/to/data --arch resnet34 --epochs 30 --out teacher.pth
"""
import argparse
import functools
import os
import tempfile
import time

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from models import RunSpec  # noqa: E402
from utils.cli import (MAX_UNREADABLE_SHARE, OneLineErrorParser, add_data_timeout_flag, add_device_flag,  # noqa: E402
                       add_workers_flag, require_at_least, require_count, require_image_size,
                       require_positive, require_seed, resolve_device, resolve_workers)
from utils.data import SeededSampler, make_loader, on_device, open_split  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.recipe import ADAMBNN  # noqa: E402
from utils.evaluation import UnreadableLimit, evaluate  # noqa: E402
from utils.run_folder import write_atomically  # noqa: E402
from utils.runtime import seed_everything  # noqa: E402
from utils.signals import bounded_waits  # noqa: E402
from utils.training_step import refusing_a_batch_of_one  # noqa: E402


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
    parser.add_argument("--arch", default=ADAMBNN.teacher,
                        help=f"torchvision classification model name (default {ADAMBNN.teacher}, the "
                             f"steps' default --teacher)")
    parser.add_argument("--out", required=True, help="file to write the trained weights to")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs")
    parser.add_argument("--batch_size", type=int, default=128, help="images per batch")
    parser.add_argument("--learning_rate", type=float, default=2e-3,
                        help="AdamW peak learning rate, cosine-annealed to zero over the run")
    parser.add_argument("--weight_decay", type=float, default=0.05, help="AdamW decoupled weight decay")
    parser.add_argument("--image_size", type=int, default=RunSpec.image_size,
                        help="training crop; use the same value as the steps' --image_size")
    add_workers_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="fixes data order, augmentation and init")
    add_data_timeout_flag(parser)
    add_device_flag(parser)
    return parser


def check_args(args):
    """Raises a UserError for values no run can use, before any time is spent training."""
    require_positive({"--epochs": args.epochs, "--batch_size": args.batch_size,
                      "--learning_rate": args.learning_rate})
    require_count({"--epochs": args.epochs, "--batch_size": args.batch_size})
    require_image_size(args.image_size)
    require_at_least(0, {"--weight_decay": args.weight_decay, "--data_timeout": args.data_timeout})
    require_seed(args.seed)
    if args.arch not in torchvision.models.list_models(module=torchvision.models):
        raise UserError(f"unknown classification model '{args.arch}': use a torchvision name such "
                        f"as resnet18 or resnet34")
    folder = os.path.dirname(os.path.abspath(args.out))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder of --out {args.out} ({e.strerror})") from None
    if os.path.isdir(args.out) or not os.access(folder, os.W_OK):
        raise UserError(f"cannot write --out {args.out}: pass a writable file path")


log = functools.partial(print, flush=True)


def train_one_epoch(model, loader, optimizer, scheduler, device, epoch, timeout):
    """One pass of cross-entropy training; returns the mean loss and acc@1 (in %). A batch that
    takes more than ``timeout`` seconds to come ends it (utils.signals.bounded_waits)."""
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    limit = UnreadableLimit(MAX_UNREADABLE_SHARE, log, images="training images")
    for i, (batch, images) in enumerate(bounded_waits(on_device(loader, device), timeout)):
        limit.update(batch.unreadable, len(batch))
        if images is None:
            continue
        target = batch.target.to(device)
        with refusing_a_batch_of_one(batch, f"the training batch {i} of epoch {epoch}"):
            logits = model(images)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.item() * len(target)
        correct += (logits.argmax(dim=1) == target).sum().item()
        count += len(target)
    return loss_sum / max(count, 1), 100 * correct / max(count, 1)


def save(state, out):
    """Writes ``state`` to ``out`` atomically: ``out`` is whole, or as it was (never a partial file).
    Where that fails (a full disk), the trained weights go to a file of the system's temporary
    folder instead (TMPDIR), and the UserError names it; where that fails too, it says that nothing
    was written."""
    try:
        write_atomically(out, lambda tmp: torch.save(state, tmp))
        return
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
    fallback = None
    try:
        descriptor, fallback = tempfile.mkstemp(prefix="teacher-", suffix=".pth")
        os.close(descriptor)
        torch.save(state, fallback)
    except (OSError, RuntimeError):
        if fallback is not None and os.path.exists(fallback):
            os.remove(fallback)
        raise UserError(f"could not write --out {out} ({reason}), nor a copy in {tempfile.gettempdir()}: "
                        f"nothing was written, and the trained weights are lost; free disk space (or "
                        f"set TMPDIR to a folder with space) and train again") from None
    raise UserError(f"could not write --out {out} ({reason}); the trained weights are saved in "
                    f"{fallback} instead: move them there once it can take them (mv {fallback} {out})")


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    check_args(args)
    device = resolve_device(args.device)
    seed_everything(args.seed)

    # The published transforms at this size: those of a step run with its defaults.
    spec = RunSpec(image_size=args.image_size)
    train_set = open_split(args.data, "train", spec)
    val_set = open_split(args.data, "val", spec,
                         class_to_idx=train_set.class_to_idx)
    workers = resolve_workers(args.workers)
    pin = device.type == "cuda"
    train_sampler = SeededSampler(len(train_set), args.seed, shuffle=True, batch_size=args.batch_size)
    train_loader = make_loader(train_set, train_sampler, args.batch_size, workers, pin)
    val_loader = make_loader(val_set, SeededSampler(len(val_set), args.seed, shuffle=False),
                             args.batch_size, workers, pin)

    num_classes = len(train_set.classes)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=num_classes).to(device)
    # AdamW with a per-iteration cosine decay: a robust default for short runs from scratch.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs * len(train_loader))
    log(f"=> training {args.arch} on {len(train_set)} images of {num_classes} classes, "
        f"validating on {len(val_set)}, on {device}")

    for epoch in range(args.epochs):
        started = time.time()
        train_sampler.set_epoch(epoch)
        loss, train_top1 = train_one_epoch(model, train_loader, optimizer, scheduler, device, epoch,
                                           args.data_timeout)
        metrics = evaluate(model, val_loader, device, log=lambda _: None, timeout=args.data_timeout)
        log(f"epoch {epoch + 1}/{args.epochs}: train loss {loss:.3f} acc@1 {train_top1:.2f}, "
            f"val acc@1 {metrics['top1']:.2f} acc@5 {metrics['top5']:.2f} "
            f"({time.time() - started:.1f}s)")

    # Metadata rides along; --teacher_weights reads the state_dict entry, and checks the classes.
    save({"state_dict": model.state_dict(), "arch": args.arch, "classes": train_set.classes,
          "val_top1": metrics["top1"]}, args.out)
    log(f"=> saved {args.arch} weights to {args.out} (val acc@1 {metrics['top1']:.2f}); use them "
        f"with --teacher {args.arch} --teacher_weights {args.out}")


if __name__ == "__main__":
    main()
