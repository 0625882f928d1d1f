"""Accuracy of a classifier on a validation loader, as every entry point reports it."""
import time

import torch
import torch.nn as nn

from . import distributed
from .cli import MAX_UNREADABLE_SHARE
from .data import on_device
from .errors import UserError
from .meters import Meters, ProgressMeter, Totals, topk_correct
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
    totals = Totals(("loss", "correct1", "correct5", "readable", "unreadable"), device)
    meters = Meters(time=("Time", ":6.3f"), loss=("Loss", ":.4e"), top1=("Acc@1", ":6.2f"),
                    top5=("Acc@5", ":6.2f"))
    progress = ProgressMeter(len(loader), meters, prefix="Test: ")
    end = time.time()
    for i, (batch, images) in enumerate(on_device(loader, device, channels_last)):
        check_unreadable(batch.unreadable, len(batch), max_unreadable_share, log)
        totals.add("unreadable", len(batch.unreadable))
        if images is None:
            continue
        target = batch.target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        correct1, correct5 = topk_correct(logits, target)
        sums = totals.add_batch(loss=loss, correct1=correct1, correct5=correct5, readable=len(target))
        n = sums["readable"]
        meters["time"].update(time.time() - end, n)
        meters["loss"].update(sums["loss"] / n, n)
        meters["top1"].update(100 * sums["correct1"] / n, n)
        meters["top5"].update(100 * sums["correct5"] / n, n)
        if print_freq and (i % print_freq == 0 or i == len(loader) - 1):
            log(progress.line(i))
        end = time.time()
    if ctx is not None:
        distributed.all_reduce_sum(totals.tensor, ctx)
    sums = totals.as_dict()
    n, excluded = sums["readable"], sums["unreadable"]
    if n == 0:
        raise UserError("no readable validation image: check the val/ folder")
    top1, top5 = 100 * sums["correct1"] / n, 100 * sums["correct5"] / n
    log(f" * acc@1 {top1:.3f} acc@5 {top5:.3f}")
    if excluded:
        log(f" * {excluded:.0f} unreadable of {n + excluded:.0f} validation images excluded from "
            f"these accuracies")
    return {"loss": sums["loss"] / n, "top1": top1, "top5": top5, "unreadable": int(excluded)}


def check_unreadable(unreadable, readable, max_share, log):
    """Warns about each unreadable image of a batch; a UserError when they are more than
    ``max_share`` of it."""
    for item in unreadable:
        log(f"warning: skipped unreadable image {item.path} ({item.reason})")
    if len(unreadable) > max_share * (readable + len(unreadable)):
        raise UserError(f"{len(unreadable)} of {readable + len(unreadable)} images of a batch "
                        f"were unreadable (e.g. {unreadable[0].path}), more than "
                        f"--max_unreadable_share {max_share}: check the dataset")
