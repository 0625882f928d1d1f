"""Accuracy of a classifier on a validation loader, as every entry point reports it."""
import time

import torch
import torch.nn as nn

from . import distributed
from .cli import MAX_UNREADABLE_SHARE
from .data import on_device
from .errors import UserError
from .meters import AverageMeter, ProgressMeter, topk_correct
from .runtime import autocast


@torch.no_grad()
def evaluate(model, loader, device, amp="none", channels_last=False, log=print, print_freq=0,
             ctx=None, max_unreadable_share=MAX_UNREADABLE_SHARE):
    """Cross-entropy, acc@1 and acc@5 (in %) on the true labels over the whole loader.

    Under DDP each rank evaluates its own part of the set and the sums are added over ranks, so
    every sample counts exactly once. Prints the published summary `` * acc@1 X acc@5 Y``, then,
    if any image could not be read, how many were left out of it. Unreadable images are skipped
    with a warning; a batch with more than ``max_unreadable_share`` of them stops the evaluation.
    """
    model.eval()
    # loss, correct@1, correct@5, readable count, unreadable count
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    meters = [AverageMeter("Time", ":6.3f"), AverageMeter("Loss", ":.4e"),
              AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")]
    progress = ProgressMeter(len(loader), meters, prefix="Test: ")
    end = time.time()
    for i, (batch, images) in enumerate(on_device(loader, device, channels_last)):
        check_unreadable(batch.unreadable, len(batch), max_unreadable_share, log)
        sums[4] += len(batch.unreadable)
        if images is None:
            continue
        target = batch.target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        batch = torch.stack([loss.double(), *[c.double() for c in topk_correct(logits, target)],
                             torch.tensor(len(target), dtype=torch.float64, device=device)])
        sums[:4] += batch
        loss_sum, c1, c5, n = batch.tolist()
        for meter, value in zip(meters, [time.time() - end, loss_sum / n, 100 * c1 / n, 100 * c5 / n]):
            meter.update(value, n)
        if print_freq and (i % print_freq == 0 or i == len(loader) - 1):
            log(progress.line(i))
        end = time.time()
    if ctx is not None:
        distributed.all_reduce_sum(sums, ctx)
    loss_sum, c1, c5, n, excluded = sums.tolist()
    if n == 0:
        raise UserError("no readable validation image: check the val/ folder")
    top1, top5 = 100 * c1 / n, 100 * c5 / n
    log(f" * acc@1 {top1:.3f} acc@5 {top5:.3f}")
    if excluded:
        log(f" * {excluded:.0f} unreadable of {n + excluded:.0f} validation images excluded from "
            f"these accuracies")
    return {"loss": loss_sum / n, "top1": top1, "top5": top5, "unreadable": int(excluded)}


def check_unreadable(unreadable, readable, max_share, log):
    """Warns about each unreadable image of a batch; a UserError when they are more than
    ``max_share`` of it."""
    for item in unreadable:
        log(f"warning: skipped unreadable image {item.path} ({item.reason})")
    if len(unreadable) > max_share * (readable + len(unreadable)):
        raise UserError(f"{len(unreadable)} of {readable + len(unreadable)} images of a batch "
                        f"were unreadable (e.g. {unreadable[0].path}), more than "
                        f"--max_unreadable_share {max_share}: check the dataset")
