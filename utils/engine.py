"""The one training engine behind step1/train.py and step2/train.py.

``main(step, ...)`` parses the flags, builds the student, the frozen teacher and the data, resumes
from ``SAVE/checkpoint.pth.tar`` when it exists, and runs the epochs: each trains with the
distillation loss, validates on the true labels and writes a checkpoint that restores everything.
"""
import contextlib
import ctypes
import json
import math
import os
import random
import signal
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

from models import load_checkpoint, reactnet
from models.checkpoint import load_weights, read_checkpoint

from . import checkpoint, distributed
from .config import build_parser, check_args
from .data import (SeededSampler, default_workers, make_loader, open_split, train_transform,
                   val_transform)
from .distill import build_teacher, distillation_loss
from .errors import UserError, report_user_errors
from .meters import AverageMeter, ProgressMeter, topk_correct
from .monitor import PaperMetrics, TrainingLog


class Stopped(Exception):
    """Training stopped on a signal after writing a resumable checkpoint."""

    def __init__(self, signum, epoch, iteration, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch} iteration "
                         f"{iteration}; saved {path}: run the same command to resume")
        self.signum = signum


class StopSignals:
    """Turns SIGTERM and SIGINT (preemption, Ctrl-C) into a request to stop at the next iteration
    boundary. A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None
        self.previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum

    def guard(self, loader):
        """Iterates ``loader`` but ends quietly if it fails after a stop was requested (its
        workers may have received the same signal and exited)."""
        iterator = iter(loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception:
                if self.requested:
                    return
                raise
            yield batch


class RunLog:
    """Prints on the main process and appends the same lines to ``SAVE/log.txt``."""

    def __init__(self, path=None, enabled=True):
        self.path, self.enabled = path, enabled

    def __call__(self, message):
        if not self.enabled:
            return
        print(message, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(message + "\n")


def build_optimizer(model, learning_rate, weight_decay, fused=False, name="adam"):
    """Adam (or SGD with momentum 0.9) with L2 weight decay on the convolution weights only.

    Group 0 (no decay): BatchNorm, learnable biases, PReLU slopes, fc. Group 1: every conv weight.
    ``fused=True`` uses PyTorch's fused kernel (faster, rounds slightly differently).
    """
    conv_weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv_ids = {id(p) for p in conv_weights}
    others = [p for p in model.parameters() if id(p) not in conv_ids]
    groups = [{"params": others}, {"params": conv_weights, "weight_decay": weight_decay}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=0.9, fused=fused or None)
    return torch.optim.Adam(groups, lr=learning_rate, betas=(0.9, 0.999), fused=fused or None)


def build_scheduler(optimizer, epochs):
    """``lr * (1 - e / epochs)``, stepped at the start of every epoch as the published code does,
    so 0-based epoch ``e`` trains at ``lr * (1 - (e + 1) / epochs)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 - e / epochs)


def autocast(device, amp):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


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


def to_device(images, device, channels_last):
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


class Trainer:
    """Everything one run holds: student, teacher, optimizer, scheduler, data, position, best."""

    def __init__(self, args, step, binary_weights, init_from=None):
        self.args, self.step = args, step
        self.ctx = distributed.init(args.device)
        check_args(args, self.ctx.world_size)
        seed_everything(args.seed)
        self.save_dir = prepare_run_folder(args.save, self.ctx)
        self.log = RunLog(os.path.join(self.save_dir, "log.txt"), self.ctx.is_main)
        self.device = self.ctx.device
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        else:
            keep_freed_host_memory()

        workers = args.workers if args.workers is not None else default_workers(self.ctx.local_world_size)
        self.train_set = open_split(args.data, "train", train_transform(args.image_size))
        self.val_set = open_split(args.data, "val", val_transform(args.image_size),
                                  class_to_idx=self.train_set.class_to_idx)
        self.num_classes = len(self.train_set.classes)
        rank, world = self.ctx.rank, self.ctx.world_size
        self.train_sampler = SeededSampler(len(self.train_set), args.seed, True, rank, world)
        self.val_sampler = SeededSampler(len(self.val_set), args.seed, False, rank, world)
        pin = self.device.type == "cuda"
        per_rank_batch = args.batch_size // world
        self.train_loader = make_loader(self.train_set, self.train_sampler, per_rank_batch, workers, pin)
        self.val_loader = make_loader(self.val_set, self.val_sampler, per_rank_batch, workers, pin)

        self.student = reactnet(self.num_classes, binary_weights=binary_weights).to(self.device)
        if args.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.student, args.learning_rate, args.weight_decay,
                                         args.fused_optimizer, args.optimizer)
        self.scheduler = build_scheduler(self.optimizer, args.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        # Below any accuracy, so the first validation always writes model_best.pth.tar.
        self.epoch, self.iteration, self.best_top1 = 0, 0, float("-inf")
        self.unreadable_count = 0
        self.initial_signs = None  # of the binary convs at the start of this step, for C2I

        # Before resuming: the teacher's random initialisation must not draw from the restored RNG.
        self.teacher = self.build_teacher().to(self.device)
        if args.channels_last:
            self.teacher.to(memory_format=torch.channels_last)

        resume_path = os.path.join(self.save_dir, checkpoint.LAST)
        if os.path.exists(resume_path):
            self.resume(resume_path)
        elif init_from is not None:
            self.initialise_from(init_from)

        # The paper's measurements read the weights, which are the same on every rank.
        self.metrics = None
        if self.ctx.is_main and not args.no_metrics:
            self.metrics = PaperMetrics(self.student, self.initial_signs)
            self.initial_signs = self.metrics.initial_signs
        self.training_log = TrainingLog(self.save_dir, self.ctx.is_main)
        self.model = self.student
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.student, device_ids=ids)
        if args.compile:
            self.model = torch.compile(self.model, backend=args.compile)
        if self.ctx.is_main:
            with open(os.path.join(self.save_dir, "args.json"), "w") as f:
                json.dump(self.resolved_args(), f, indent=2)

    def resolved_args(self):
        return dict(vars(self.args), step=self.step, num_classes=self.num_classes,
                    world_size=self.ctx.world_size)

    def build_teacher(self):
        # One process downloads the weights; the others wait and read them from the cache.
        if not self.ctx.is_main:
            distributed.barrier(self.ctx)
        teacher = build_teacher(self.args.teacher, self.num_classes, self.args.teacher_weights)
        if self.ctx.is_main:
            distributed.barrier(self.ctx)
        return teacher

    def initialise_from(self, path):
        if not os.path.isfile(path):
            raise UserError(f"no step-1 checkpoint at {path}: run step 1 first (bash step1/run.sh) "
                            f"or pass --step1_checkpoint PATH (or 'none' to train step 2 from scratch)")
        load_checkpoint(self.student, path)
        self.log(f"=> initialised from step-1 weights {path}")

    def state_dict(self):
        return {
            "epoch": self.epoch,            # completed epochs
            "iteration": self.iteration,    # completed iterations of the epoch in progress
            "state_dict": self.student.state_dict(),
            "best_top1_acc": self.best_top1,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "num_classes": self.num_classes,
            "args": self.resolved_args(),
            "rng": checkpoint.rng_state(),
            "initial_signs": self.initial_signs,
        }

    def resume(self, path):
        state = read_checkpoint(path)
        if state.get("step") != self.step or state.get("num_classes") != self.num_classes:
            made_by = (f"step {state.get('step')} with {state.get('num_classes')} classes"
                       if "step" in state else "something other than this repository's training")
            raise UserError(f"{path} was made by {made_by}, but this is step {self.step} with "
                            f"{self.num_classes} classes: pass a new --save folder for this run")
        saved_optimizer = state["args"].get("optimizer", "adam")
        if saved_optimizer != self.args.optimizer:
            raise UserError(f"{path} was trained with --optimizer {saved_optimizer}, not "
                            f"{self.args.optimizer}: resume with the run's own flags or pass a new --save")
        load_weights(self.student, state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.best_top1 = state["best_top1_acc"]
        checkpoint.set_rng_state(state["rng"])
        self.initial_signs = state.get("initial_signs")
        changed = {k: (v, getattr(self.args, k)) for k, v in state["args"].items()
                   if hasattr(self.args, k) and getattr(self.args, k) != v}
        self.log(f"=> resuming {path} at epoch {self.epoch} iteration {self.iteration} "
                 f"(best acc@1 {self.best_top1:.3f})")
        if changed:
            self.log(f"=> flags changed since the checkpoint (the optimizer keeps its saved "
                     f"settings): {changed}")

    def save(self, is_best=False):
        if self.ctx.is_main:
            checkpoint.save(self.state_dict(), self.save_dir, is_best)
        distributed.barrier(self.ctx)

    def fit(self):
        args = self.args
        if self.epoch >= args.epochs:
            self.log(f"=> {self.save_dir} already holds all {args.epochs} epochs; nothing to do")
            return
        with warnings.catch_warnings(), StopSignals() as stop:
            # The schedule is stepped before the epoch's first optimizer step on purpose.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            while self.epoch < args.epochs:
                if self.iteration == 0:
                    self.scheduler.step()
                self.log(f"learning_rate: {self.optimizer.param_groups[0]['lr']}")
                started = time.time()
                lr = self.optimizer.param_groups[0]["lr"]
                train = self.train_one_epoch(stop)
                distributed.broadcast_buffers(self.student, self.ctx)
                val = evaluate(self.student, self.val_loader, self.device, args.amp,
                               args.channels_last, self.log, args.print_freq, self.ctx)
                record = {"lr": lr, "epoch_time": time.time() - started,
                          **{f"train_{k}": v for k, v in train.items()},
                          **{f"val_{k}": v for k, v in val.items()},
                          **(self.metrics.epoch_summary() if self.metrics else {})}
                self.training_log.epoch(self.epoch, record, self.student)
                self.epoch, self.iteration = self.epoch + 1, 0
                is_best = val["top1"] > self.best_top1
                self.best_top1 = max(self.best_top1, val["top1"])
                self.save(is_best)
                skipped = (f"; {self.unreadable_count} unreadable training images skipped so far"
                           if self.unreadable_count else "")
                self.log(f"=> epoch {self.epoch - 1} done in {time.time() - started:.1f}s; "
                         f"best acc@1 {self.best_top1:.3f}{skipped}")
                if stop.requested and self.epoch < args.epochs:
                    raise self.stopped(stop)

    def stopped(self, stop):
        return Stopped(stop.requested, self.epoch, self.iteration,
                       os.path.join(self.save_dir, checkpoint.LAST))

    def train_one_epoch(self, stop):
        """Trains from ``self.iteration`` to the end of ``self.epoch``.

        Between iterations it writes a mid-epoch checkpoint every ``--save_every_iters``, and when a
        stop signal arrived it writes one and raises Stopped.
        """
        args = self.args
        self.model.train()
        self.train_sampler.set_epoch(self.epoch, start=self.iteration * self.train_loader.batch_size)
        num_batches = self.iteration + len(self.train_loader)
        meters = [AverageMeter("Time", ":6.3f"), AverageMeter("Data", ":6.3f"),
                  AverageMeter("Loss", ":.4e"), AverageMeter("Acc@1", ":6.2f"),
                  AverageMeter("Acc@5", ":6.2f")]
        batch_time, data_time, losses, top1, top5 = meters
        progress = ProgressMeter(num_batches, meters, prefix=f"Epoch: [{self.epoch}]")
        end, stopping = time.time(), False
        if self.metrics:
            self.metrics.start_epoch()
        # Hooks inside a compiled model would force recompilation, so saturation is sampled eagerly only.
        sample_saturation = self.metrics and not args.compile
        for images, target, unreadable in stop.guard(self.train_loader):
            i = self.iteration
            data_time.update(time.time() - end)
            self.report_unreadable(unreadable, images)
            images = to_device(images, self.device, args.channels_last)
            target = target.to(self.device, non_blocking=True)
            with autocast(self.device, args.amp), \
                    (self.metrics.sample_saturation() if sample_saturation else contextlib.nullcontext()):
                logits = self.model(images)
                with torch.inference_mode():
                    teacher_logits = self.teacher(images)
            loss = distillation_loss(logits, teacher_logits.clone())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            correct1, correct5 = topk_correct(logits.detach(), target)
            loss_value, c1, c5 = torch.stack([loss.detach(), correct1, correct5]).tolist()
            stopping, diverged = distributed.any_rank([stop.requested, not math.isfinite(loss_value)],
                                                      self.ctx)
            if diverged:
                raise UserError(f"the loss became non-finite ({loss_value}) at epoch {self.epoch} "
                                f"iteration {i}; stopped before updating the weights, the last "
                                f"checkpoint in {self.save_dir} is kept: resume with a lower "
                                f"--learning_rate or without --amp")
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.metrics:
                self.metrics.after_step()
            self.iteration += 1
            n = len(target)
            losses.update(loss_value, n)
            top1.update(100 * c1 / n, n)
            top5.update(100 * c5 / n, n)
            batch_time.update(time.time() - end)
            if i % args.print_freq == 0 or i == num_batches - 1 or stopping:
                self.log(progress.line(i))
                self.training_log.iteration(self.epoch * num_batches + i, {
                    "loss": loss_value, "acc1": 100 * c1 / n, "acc5": 100 * c5 / n,
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "images_per_s": n * self.ctx.world_size / batch_time.val})
            if stopping or (args.save_every_iters and self.iteration % args.save_every_iters == 0
                            and self.iteration < num_batches):
                self.save()
            if stopping:
                break
            end = time.time()
        if stop.requested:
            if not stopping:  # the loader broke off (its workers got the signal too): save here
                self.save()
            raise self.stopped(stop)
        return {"loss": losses.avg, "top1": top1.avg, "top5": top5.avg}

    def report_unreadable(self, unreadable, images):
        """Warns about each skipped file; stops when too much of the batch was unreadable."""
        warn_unreadable(unreadable, self.log)
        self.unreadable_count += len(unreadable)
        readable = 0 if images is None else len(images)
        if len(unreadable) > self.args.max_unreadable_share * (readable + len(unreadable)):
            raise UserError(f"{len(unreadable)} of {readable + len(unreadable)} images of a batch "
                            f"were unreadable (e.g. {unreadable[0].path}), more than "
                            f"--max_unreadable_share {self.args.max_unreadable_share}: check the dataset")


# glibc mallopt options and the values set by keep_freed_host_memory.
MALLOC_SETTINGS = {"M_TRIM_THRESHOLD": (-1, 2**31 - 1), "M_TOP_PAD": (-2, 256 * 2**20),
                   "M_MMAP_THRESHOLD": (-3, 2**30)}


def keep_freed_host_memory():
    """Makes glibc's malloc keep freed memory for the next iteration instead of returning it.

    A CPU training iteration allocates and frees the same large tensors every time. By default
    glibc maps blocks of a few MB and more freshly from the system and gives freed heap back, so
    every iteration page-faults its working set in again: about 13% of a step-2 iteration at 64 px
    on a 2-core CPU. The process's resident memory then stays at its peak. Numerics are untouched.

    Returns:
        True if every setting took; False where the C library is not glibc.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all([mallopt(option, value) == 1 for option, value in MALLOC_SETTINGS.values()])


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def prepare_run_folder(folder, ctx):
    """Creates the run folder on the main process and checks that it is writable."""
    folder = os.path.abspath(folder)
    if ctx.is_main:
        try:
            os.makedirs(folder, exist_ok=True)
            checkpoint.remove_partial_files(folder)
            probe = os.path.join(folder, f".write_test.{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {folder} ({e.strerror}): pass a "
                            f"writable --save") from None
    distributed.barrier(ctx)
    return folder


def main(step, binary_weights, weight_decay, init_from=None):
    """Entry point of both steps.

    Args:
        step: 1 or 2, recorded in every checkpoint so a run folder is never resumed by the other step.
        binary_weights: the student's ``binary_weights``.
        weight_decay: the step's default ``--weight_decay``.
        init_from: for step 2, a function of the parsed args that returns the step-1 checkpoint to
            start from, or None to start from scratch.
    """
    args = build_parser(step, weight_decay).parse_args()
    run = report_user_errors(lambda: _train(args, step, binary_weights, init_from))
    run()


def _train(args, step, binary_weights, init_from):
    trainer = Trainer(args, step, binary_weights, init_from(args) if init_from else None)
    trainer.log(f"=> step {step}: ReActNet-A, {trainer.num_classes} classes, "
                f"{len(trainer.train_set)} train / {len(trainer.val_set)} val images, "
                f"{trainer.ctx.world_size} process(es) on {trainer.device}")
    try:
        trainer.fit()
    except Stopped as stopped:
        trainer.log(f"=> {stopped}")
        sys.exit(128 + stopped.signum)
    finally:
        trainer.training_log.close()
        distributed.shutdown(trainer.ctx)
