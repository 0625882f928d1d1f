"""One training iteration of the recipe, shared by the trainer and the benchmark; and what a
training batch too small to train on says, shared by the trainer and tools.train_teacher."""
import contextlib
import math
from dataclasses import dataclass

import torch

from . import distributed
from .distill import distillation_loss
from .errors import UserError
from .meters import topk_correct
from .runtime import autocast


# How torch's BatchNorm refuses a training batch of one sample whose feature map is 1x1.
BATCH_OF_ONE = "Expected more than 1 value per channel when training"


def unusable_batch(batch, what, where, processes=None):
    """The UserError for the training batch ``where`` (e.g. "the training batch at epoch 0
    iteration 3") that holds ``what``: naming its unreadable images if it has any, else the batch
    size to use (per process, with ``processes`` given)."""
    if batch.unreadable:
        first = batch.unreadable[0]
        return UserError(f"{where} has {what}: {len(batch.unreadable)} of its images are "
                         f"unreadable (first {first.path}: {first.reason}); remove or repair "
                         f"them, or lower --max_unreadable_share to stop at the first")
    per_process = f" per process ({processes} process(es))" if processes else ""
    return UserError(f"{where} has {what}: use --batch_size of at least 2{per_process}, or larger images")


@contextlib.contextmanager
def refusing_a_batch_of_one(batch, where, processes=None):
    """Turns BatchNorm's refusal of a training batch of one image (where the feature map is 1x1,
    as at 32 px) into ``unusable_batch``'s UserError."""
    try:
        yield
    except ValueError as e:
        if not str(e).startswith(BATCH_OF_ONE):
            raise
        raise unusable_batch(batch, "1 readable image, which BatchNorm cannot normalise where the "
                                    "feature map is 1x1", where, processes) from None


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite; the weights were not updated."""

    def __init__(self, loss):
        super().__init__(f"non-finite loss {loss}")
        self.loss = loss


@dataclass
class StepResult:
    loss: float
    correct1: float  # samples whose label is the top-1 prediction
    correct5: float
    stop: bool  # a stop was requested on some rank: every rank stops after this step


class TrainingStep:
    """Student forward under autocast, teacher forward under inference mode, distillation loss,
    backward, then the optimizer update, unless the loss is non-finite on any rank.

    The loss and the top-k counts are read back to the host once per step; the same collective
    that agrees on a non-finite loss also agrees on a stop request, so all ranks stop together.

    Args:
        model: the student as it runs (possibly DDP-wrapped or compiled).
        teacher: the frozen teacher.
        optimizer: its optimizer.
        device: where the batch lives.
        amp: ``none``, ``bf16`` or ``fp16``.
        scaler: a GradScaler (enabled for fp16); None for no loss scaling.
        ctx: the distributed context; None for a single process.
        after_update: called after every optimizer update (the paper's flip-flop bookkeeping).
    """

    def __init__(self, model, teacher, optimizer, device, amp="none", scaler=None, ctx=None,
                 after_update=None):
        self.model, self.teacher, self.optimizer = model, teacher, optimizer
        self.device, self.amp, self.ctx, self.after_update = device, amp, ctx, after_update
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)

    def __call__(self, images, target, stop_requested=lambda: False):
        """One iteration. ``stop_requested()`` is asked after the backward pass, when the ranks
        agree on it, so that a stop signal that arrives during this iteration ends the run after it."""
        with autocast(self.device, self.amp):
            logits = self.model(images)
            with torch.inference_mode():
                teacher_logits = self.teacher(images)
        # The clone turns the inference tensor into one autograd may read.
        loss = distillation_loss(logits, teacher_logits.clone())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        correct1, correct5 = topk_correct(logits.detach(), target)
        loss_value, c1, c5 = torch.stack([loss.detach(), correct1, correct5]).tolist()
        stop, diverged = distributed.any_rank([stop_requested(), not math.isfinite(loss_value)], self.ctx)
        if diverged:
            raise NonFiniteLoss(loss_value)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_update:
            self.after_update()
        return StepResult(loss_value, c1, c5, stop)
