"""Accuracy of a classifier on a validation loader, as every entry point reports it."""
import math
import time

import torch
import torch.nn as nn

from . import distributed
from .cli import MAX_UNREADABLE_SHARE, UNREADABLE_FLOOR
from .data import on_device
from .errors import UserError
from .meters import Meters, ProgressMeter, Totals, topk_correct
from .runtime import autocast
from .signals import DATA_TIMEOUT, bounded_waits


@torch.no_grad()
def evaluate(model, loader, device, amp="none", channels_last=False, log=print, print_freq=0,
             ctx=None, max_unreadable_share=MAX_UNREADABLE_SHARE, stop=None, timeout=DATA_TIMEOUT):
    """Cross-entropy, acc@1 and acc@5 (in %) on the true labels over the whole loader.

    Under DDP each rank evaluates its own part of the set and the sums are added over ranks, so
    every sample counts exactly once. Prints the published summary `` * acc@1 X acc@5 Y``, then,
    if any image could not be read, how many were left out of it. Unreadable images are skipped
    with a warning; more than ``max_unreadable_share`` of them stop the evaluation (UnreadableLimit).
    A batch that takes more than ``timeout`` seconds to come raises DataStalled, and with ``stop``
    (training's StopSignals) a stop signal during a wait raises StopWhileWaiting
    (``utils.signals.bounded_waits``).
    """
    model.eval()
    totals = Totals(("loss", "correct1", "correct5", "readable", "unreadable"), device)
    meters = Meters(time=("Time", ":6.3f"), loss=("Loss", ":.4e"), top1=("Acc@1", ":6.2f"),
                    top5=("Acc@5", ":6.2f"))
    progress = ProgressMeter(len(loader), meters, prefix="Test: ")
    end = time.time()
    limit = UnreadableLimit(max_unreadable_share, log, ctx, "validation images")
    batches = bounded_waits(on_device(loader, device, channels_last), timeout, stop)
    for i, (batch, images) in enumerate(batches):
        limit.update(batch.unreadable, len(batch))
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
        # Rank 0 holds the largest part of the set: the others count along until it is done.
        for _ in range(math.ceil(math.ceil(len(loader.dataset) / ctx.world_size) / loader.batch_size)
                       - len(loader)):
            limit.update([], 0)
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


class UnreadableLimit:
    """Counts the images of one pass over a split (an epoch) read so far and those that could not
    be; stops the pass when the unreadable ones are more than ``max_share`` of all read and more
    than ``UNREADABLE_FLOOR`` (any one, when ``max_share`` is 0).

    It judges the running totals after every batch, never a batch's own share: a lone bad file in
    a small last batch does not stop a pass that a larger batch size would finish, and the batch
    size only decides how many images after a bad file are counted when it is judged. The totals
    are summed over processes, so every process decides the same, on the numbers a single process
    reading the same images would have.

    Args:
        max_share: ``--max_unreadable_share``.
        log: prints the warning naming each unreadable image.
        ctx: the distributed context; None for a single process. Every process must call ``update``
            the same number of times.
        images: what the images are, for the error message.
    """

    def __init__(self, max_share, log, ctx=None, images="images"):
        self.max_share, self.log, self.ctx, self.images = max_share, log, ctx, images
        self.unreadable, self.read, self.example = 0, 0, None

    def update(self, unreadable, readable):
        """Adds one batch: its UnreadableImages and its number of readable images."""
        for item in unreadable:
            self.log(f"warning: skipped unreadable image {item.path} ({item.reason})")
            self.example = item.path
        counts = [len(unreadable), len(unreadable) + readable]
        if self.ctx is not None and self.ctx.distributed:
            counts = distributed.all_reduce_sum(torch.tensor(counts, device=self.ctx.device), self.ctx).tolist()
        self.unreadable += counts[0]
        self.read += counts[1]
        allowed = max(UNREADABLE_FLOOR, self.max_share * self.read) if self.max_share else 0
        if self.unreadable > allowed:
            example = f" (e.g. {self.example})" if self.example else ""
            raise UserError(f"{self.unreadable} of the {self.read} {self.images} read so far were "
                            f"unreadable{example}, more than --max_unreadable_share {self.max_share} "
                            f"of them and more than {UNREADABLE_FLOOR if self.max_share else 0}: "
                            f"check the dataset")
