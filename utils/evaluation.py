"""Accuracy of a classifier on a validation loader, as every entry point reports it."""
import time

import torch
import torch.nn as nn

from . import distributed
from .errors import UserError
from .meters import AverageMeter, ProgressMeter, topk_correct
from .runtime import autocast, to_device


@torch.no_grad()
def evaluate(model, loader, device, amp="none", channels_last=False, log=print, print_freq=0,
             ctx=None):
    """Cross-entropy, acc@1 and acc@5 (in %) on the true labels over the whole loader.

    Under DDP each rank evaluates its own part of the set and the sums are added over ranks, so
    every sample counts exactly once. Prints the published summary `` * acc@1 X acc@5 Y``.
    """
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct@1, correct@5, count
    meters = [AverageMeter("Time", ":6.3f"), AverageMeter("Loss", ":.4e"),
              AverageMeter("Acc@1", ":6.2f"), AverageMeter("Acc@5", ":6.2f")]
    progress = ProgressMeter(len(loader), meters, prefix="Test: ")
    end = time.time()
    for i, (images, target, unreadable) in enumerate(loader):
        warn_unreadable(unreadable, log)
        if images is None:
            continue
        images, target = to_device(images, device, channels_last), target.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        batch = torch.stack([loss.double(), *[c.double() for c in topk_correct(logits, target)],
                             torch.tensor(len(target), dtype=torch.float64, device=device)])
        sums += batch
        loss_sum, c1, c5, n = batch.tolist()
        for meter, value in zip(meters, [time.time() - end, loss_sum / n, 100 * c1 / n, 100 * c5 / n]):
            meter.update(value, n)
        if print_freq and (i % print_freq == 0 or i == len(loader) - 1):
            log(progress.line(i))
        end = time.time()
    if ctx is not None:
        distributed.all_reduce_sum(sums, ctx)
    loss_sum, c1, c5, n = sums.tolist()
    if n == 0:
        raise UserError("no readable validation image: check the val/ folder")
    top1, top5 = 100 * c1 / n, 100 * c5 / n
    log(f" * acc@1 {top1:.3f} acc@5 {top5:.3f}")
    return {"loss": loss_sum / n, "top1": top1, "top5": top5}


def warn_unreadable(unreadable, log):
    for item in unreadable:
        log(f"warning: skipped unreadable image {item.path} ({item.reason})")
