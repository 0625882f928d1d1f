"""The training engine behind step1/train.py and step2/train.py.

``main(step)`` parses the flags, builds the student, the frozen teacher and the data, resumes
from ``SAVE/checkpoint.pth.tar`` when it exists, and runs the epochs: each trains with the
distillation loss, validates on the true labels and writes a checkpoint that restores everything.
"""
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import replace

import torch
import torch.nn as nn

from models import build_model
from models.checkpoint import load_weights, read_checkpoint, title_of
from models.layers import use_deterministic_pooling
from models.spec import recorded_fields, resolve

from . import distributed, optim, run_folder
from .cli import describe_overrides, given_spec, resolve_workers
from .data import SeededSampler, make_loader, on_device, open_split, require_classes
from .distill import build_teacher
from .errors import UserError, report_user_errors
from .evaluation import UnreadableLimit, evaluate
from .meters import Meters, ProgressMeter
from .monitor import MetricsLog, PaperMetrics
from .optim import build_optimizer, build_scheduler
from .pipeline import describe_jpeg_decoder
from .runtime import configure_device, seed_everything
from .signals import DataStopped, StopSignals, StopWhileWaiting, Stopped
from .recipe import get_recipe
from .training_flags import build_parser, fill_defaults, step1_checkpoint, validate, validate_resolved
from .training_step import NonFiniteLoss, TrainingStep, refusing_a_batch_of_one, unusable_batch


# RunSpec fields that no resumed run may change: which model and binarizers it trains, and the
# recipe its flags follow. Step 2 may change all but the architecture of the step-1 checkpoint it
# starts from, whose weights must fit.
FIXED_ON_RESUME = ("arch", "act_binarizer", "weight_binarizer", "recipe")
FIXED_FROM_STEP1 = ("arch",)
# What step 2 does not take from the step-1 checkpoint: its own step, and the classes of its data.
NOT_FROM_STEP1 = ("step", "num_classes")

# Flags whose change makes another experiment: a resume with other values is refused unless asked
# for. The data backend and the share of JPEGs it leaves to PIL are among them: the device's pixels
# differ from PIL's by up to a grey level.
EXPERIMENT_FLAGS = ("learning_rate", "weight_decay", "epochs", "batch_size", "optimizer", "teacher",
                    "teacher_weights", "image_size", "crop_pct", "resize_rounding", "interpolation", "mean", "std", "seed",
                    "data", "data_backend", "cpu_decode_share", "step1_checkpoint")
# Flags that change only speed or rounding: a resume may change them, and the change is recorded.
# The others (workers, printing, device...) may change freely between runs.
SPEED_FLAGS = ("amp", "fused_optimizer", "channels_last", "compile", "deterministic", "jpeg_decoder")
# Flags that name what the run reads: compared by the folder's real path and the files' content.
INPUT_FLAGS = ("data", "teacher_weights", "step1_checkpoint")

# What a resume reads from a checkpoint besides its step and number of classes.
RESUMED_ENTRIES = ("epoch", "iteration", "state_dict", "best_top1_acc", "optimizer", "scheduler",
                   "scaler", "args", "rng")


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_inputs(args):
    """What the path flags point to: the data folder's real path, and each weight file's real path
    and content hash (no hash where the file is absent), so that another name for the same folder
    or file, or a byte-identical copy of a file, is no change. A weight flag naming no file has no
    entry."""
    inputs = {"data": {"path": os.path.realpath(args["data"])}}
    for flag in INPUT_FLAGS[1:]:
        path = args.get(flag)
        if path is not None and path.lower() != "none":
            inputs[flag] = {"path": os.path.realpath(path),
                            "sha256": file_sha256(path) if os.path.isfile(path) else None}
    return inputs


def same_input(old, new):
    """Two ``describe_inputs`` entries: the same content where both files were read, else the same path."""
    if old is None or new is None:
        return old is new
    if old.get("sha256") and new.get("sha256"):
        return old["sha256"] == new["sha256"]
    return old["path"] == new["path"]


def shown(value, identity):
    """A flag's value as a change names it: for a path, the real path, and the start of a file's hash."""
    if identity is None:
        return value
    digest = identity.get("sha256")
    return f"{identity['path']} (sha256 {digest[:12]})" if digest else identity["path"]


def changed_flags(state, args, inputs):
    """``{flag: (saved value, new value)}`` for each experiment or speed flag that differs from the
    checkpoint's. Paths are compared by ``describe_inputs``; a checkpoint written before it kept
    them has its recorded paths resolved and hashed now."""
    saved_args, new_args = state["args"], vars(args)
    saved_inputs = state.get("inputs") or describe_inputs(saved_args)
    changes = {}
    for flag in EXPERIMENT_FLAGS + SPEED_FLAGS:
        if flag not in saved_args:
            continue
        if flag in INPUT_FLAGS:
            same = same_input(saved_inputs.get(flag), inputs.get(flag))
        else:
            same = saved_args[flag] == new_args[flag]
        if not same:
            changes[flag] = (shown(saved_args[flag], saved_inputs.get(flag)),
                             shown(new_args[flag], inputs.get(flag)))
    return changes


def describe_changes(changes):
    return ", ".join(f"--{flag} {old} -> {new}" for flag, (old, new) in changes.items())


class TrainingData:
    """The train and val splits, their seeded samplers and loaders, for this process's share."""

    def __init__(self, args, ctx, spec):
        workers = resolve_workers(args.workers, ctx.local_world_size)
        self.train_set = open_split(args.data, "train", spec, args.data_backend,
                                    cpu_decode_share=args.cpu_decode_share, jpeg_decoder=args.jpeg_decoder)
        self.val_set = open_split(args.data, "val", spec, args.data_backend,
                                  class_to_idx=self.train_set.class_to_idx,
                                  cpu_decode_share=args.cpu_decode_share,
                                  jpeg_decoder=self.train_set.jpeg_decoder)
        self.classes = list(self.train_set.classes)  # in label order
        self.num_classes = len(self.classes)
        self.train_folder = os.path.join(args.data, "train")
        per_rank_batch = args.batch_size // ctx.world_size
        self.train_sampler = SeededSampler(len(self.train_set), args.seed, True, ctx.rank, ctx.world_size,
                                           per_rank_batch)
        # Validation draws nothing from its seeds but the gpu backend's PIL share: seed 0, as in
        # evaluate.py, so that both decode each file the same way.
        self.val_sampler = SeededSampler(len(self.val_set), 0, False, ctx.rank, ctx.world_size)
        pin = ctx.device.type == "cuda"
        self.train_loader = make_loader(self.train_set, self.train_sampler, per_rank_batch, workers, pin)
        self.val_loader = make_loader(self.val_set, self.val_sampler, per_rank_batch, workers, pin)


class Trainer:
    """One run: student, teacher, optimizer, schedule, data, position in training, best accuracy."""

    def __init__(self, args, step):
        self.args, self.step = args, step
        self.ctx = distributed.init(args.device)
        self.device = self.ctx.device
        validate(args)
        seed_everything(args.seed)
        self.save_dir, self.folder_lock = run_folder.prepare_run_folder(args.save, self.ctx)
        self.log = run_folder.ConsoleLog(os.path.join(self.save_dir, "log.txt"), self.ctx.is_main)
        self.resume_path = os.path.join(self.save_dir, run_folder.LAST)
        self.resume_state = self.start_state = None  # the checkpoints read to resume or start from
        spec = self.resolve_spec()
        validate_resolved(args, spec, self.ctx.world_size)
        configure_device(self.device, args.deterministic)
        self.data = TrainingData(args, self.ctx, spec)
        args.jpeg_decoder = self.data.train_set.jpeg_decoder  # the one chosen, or None with pil
        if args.jpeg_decoder:
            self.log(describe_jpeg_decoder(args.jpeg_decoder))
        self.spec = replace(spec, num_classes=self.data.num_classes)
        self.num_classes = self.spec.num_classes
        self.student = build_model(self.spec)
        if args.deterministic and self.device.type == "cuda":
            use_deterministic_pooling(self.student)
        self.student.to(self.device)
        if args.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.recipe = get_recipe(self.spec.recipe, step)
        self.optimizer = build_optimizer(self.student, args.learning_rate, args.weight_decay,
                                         args.fused_optimizer, args.optimizer, self.recipe.groups)
        self.scheduler = build_scheduler(self.optimizer, args.epochs, self.recipe.schedule, args.learning_rate)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        # Below any accuracy, so the first validation always writes model_best.pth.tar.
        self.epoch, self.iteration, self.best_top1 = 0, 0, float("-inf")
        self.saved_at = None  # (epoch, iteration) of the run folder's checkpoint, once there is one
        self.unreadable_count = 0
        # The epoch in progress's loss and accuracy meters, whose sums a mid-epoch checkpoint keeps
        # so that the epoch's record covers all its iterations; those restored wait in resumed_sums.
        self.running, self.resumed_sums = {}, {}
        self.initial_signs = None  # of the binary convs at the start of this step, for C2I
        self.flag_changes = []  # each resume that applied changed experiment or speed flags

        # Before resuming: the teacher's random initialisation must not draw from the restored RNG.
        self.teacher = self.build_teacher().to(self.device)
        if args.channels_last:
            self.teacher.to(memory_format=torch.channels_last)
        if args.compile:
            self.teacher = torch.compile(self.teacher, backend=args.compile)
        self.inputs = describe_inputs(vars(args))
        self.restore_or_initialise()

        # The paper's measurements read the weights, which are the same on every rank.
        self.metrics = None
        if self.ctx.is_main and not args.no_metrics:
            self.metrics = PaperMetrics(self.student, self.initial_signs)
            self.initial_signs = self.metrics.initial_signs
        self.metrics_log = MetricsLog(self.save_dir, self.ctx.is_main)
        self.model = self.wrap(self.student)
        self.training_step = TrainingStep(
            self.model, self.teacher, self.optimizer, self.device, args.amp, self.scaler, self.ctx,
            after_update=self.metrics.after_step if self.metrics else None)
        if self.ctx.is_main:
            with open(os.path.join(self.save_dir, "args.json"), "w") as f:
                json.dump(self.resolved_args(), f, indent=2)

    def resolved_args(self):
        """The flags as the run uses them, with the rest of its RunSpec: what args.json holds."""
        return dict(vars(self.args), step=self.step, num_classes=self.num_classes,
                    world_size=self.ctx.world_size)

    def build_teacher(self):
        # One process downloads the weights; the others wait and read them from the cache.
        if not self.ctx.is_main:
            distributed.barrier(self.ctx)
        teacher = build_teacher(self.args.teacher, self.num_classes, self.args.teacher_weights,
                                classes=self.data.classes, folder=self.data.train_folder)
        if self.ctx.is_main:
            distributed.barrier(self.ctx)
        return teacher

    def wrap(self, student):
        """The student as it runs: DDP across processes, compiled if asked."""
        model = student
        if self.ctx.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(student, device_ids=ids)
        if self.args.compile:
            model = torch.compile(model, backend=self.args.compile)
        return model

    def resolve_spec(self):
        """The run's RunSpec (models/spec.py), resolved once: the architecture's defaults, then what
        the checkpoint resumed (or, for step 2, started from) recorded, then the flags given. Fills
        the flags with it, and the training flags not given with its recipe's values. Reads that
        checkpoint once; the number of classes is the data's, set later."""
        args, start_from = self.args, step1_checkpoint(self.args)
        recorded, source, fixed = {}, None, ()
        if os.path.exists(self.resume_path):
            self.resume_state = read_checkpoint(self.resume_path)
            recorded, source, fixed = recorded_fields(self.resume_state), self.resume_path, FIXED_ON_RESUME
        elif start_from is not None:
            if not os.path.isfile(start_from):
                raise UserError(f"no step-1 checkpoint at {start_from}: run step 1 first (bash "
                                f"step1/run.sh) or pass --step1_checkpoint PATH (or 'none' to train "
                                f"step 2 from scratch)")
            self.start_state = read_checkpoint(start_from)
            if self.start_state.get("step", 1) != 1:
                raise UserError(f"{start_from} was made by step {self.start_state['step']}, not step 1: "
                                f"pass step 1's model_best.pth.tar as --step1_checkpoint (a step-2 run "
                                f"folder is continued by passing it as --save)")
            recorded = {name: value for name, value in recorded_fields(self.start_state).items()
                        if name not in NOT_FROM_STEP1}
            source, fixed = start_from, FIXED_FROM_STEP1
        given = given_spec(args)
        for name in fixed:
            if given[name] is not None and name in recorded and given[name] != recorded[name]:
                fix = (f"drop --{name} to continue it, or pass a new --save" if source == self.resume_path
                       else f"drop --{name} to start from it (step 2 takes the step-1 file's), or pass the "
                            f"--step1_checkpoint of a step-1 run with --{name} {given[name]}")
                raise UserError(f"{source} was trained with --{name} {recorded[name]}, not {given[name]}: {fix}")
        spec, overrides = resolve(given, recorded)
        if self.start_state is not None:  # a resumed run reports its changes as changed flags
            for line in describe_overrides(overrides):
                self.log(line)
        for name in given:  # as argparse holds them (lists), so that args.json says the same
            value = getattr(spec, name)
            setattr(args, name, list(value) if isinstance(value, tuple) else value)
        fill_defaults(args, get_recipe(spec.recipe, self.step), self.step)
        return replace(spec, step=self.step)

    def restore_or_initialise(self):
        """Resumes the run folder's checkpoint if there is one, else starts step 2 from step 1."""
        if self.resume_state is not None:
            self.resume(self.resume_path, self.resume_state)
        elif self.start_state is not None:
            path = step1_checkpoint(self.args)
            self.check_classes(self.start_state, path, "train step 2 on the data step 1 was trained "
                                                       "on, or pass the --step1_checkpoint of a step-1 "
                                                       "run on these classes")
            load_weights(self.student, self.start_state, path)
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
            "args": self.resolved_args(),
            "rng": run_folder.rng_state(),
            "initial_signs": self.initial_signs,
            "flag_changes": self.flag_changes,
            "running_sums": {name: [meter.sum, meter.count] for name, meter in self.running.items()}
            if self.iteration else {},
            "inputs": self.inputs,
            **self.spec.as_dict(),  # the RunSpec, its step and num_classes included
            "classes": self.data.classes,  # the class folders' names, in label order
        }

    def check_classes(self, state, path, fix):
        """A UserError unless the data's classes are those the checkpoint ``state`` (read from
        ``path``) was trained on, by name and in label order (``require_classes``); ``fix`` says
        what to do. A checkpoint written before they were recorded has only their number checked."""
        folder = self.data.train_folder
        if "classes" in state:
            require_classes(state["classes"], self.data.classes, folder, path, fix)
        elif state.get("num_classes", self.num_classes) != self.num_classes:
            raise UserError(f"{path} was trained on {state['num_classes']} classes but {folder} has "
                            f"{self.num_classes} class folders: {fix}")
        else:
            self.log(f"=> {path} records no class names (written before checkpoints kept them): the "
                     f"class folders of {folder} are taken to be those it was trained on, in the same order")

    def resume(self, path, state):
        if state.get("step") != self.step:
            made_by = (f"step {state.get('step')}" if "step" in state
                       else "something other than this repository's training")
            raise UserError(f"{path} was made by {made_by}, but this is step {self.step}: pass a new "
                            f"--save folder for this run")
        self.check_classes(state, path, "restore the class folders it was trained on to resume it, or "
                                        "pass a new --save for a new run on these classes")
        missing = [entry for entry in RESUMED_ENTRIES if entry not in state]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}, so it cannot be resumed: it was not "
                            f"written by this repository's training; pass a new --save folder")
        changes = self.check_changes(state, path)
        load_weights(self.student, state, path)
        for group in state["optimizer"]["param_groups"]:  # this run's kernel, not the saved one's
            group["fused"] = self.optimizer.param_groups[0]["fused"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved without --amp fp16: this run's scaler starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iteration = state["epoch"], state["iteration"]
        self.saved_at = (self.epoch, self.iteration)
        if self.non_finite_tensors():
            raise UserError(f"{path} holds NaN or infinite weights or optimizer state, from which no "
                            f"run can continue: pass a new --save")
        self.best_top1 = state["best_top1_acc"]
        run_folder.set_rng_state(state["rng"])
        self.initial_signs = state.get("initial_signs")
        self.flag_changes = state.get("flag_changes", [])
        self.resumed_sums = state.get("running_sums", {})
        self.log(f"=> resuming {path} at epoch {self.epoch} iteration {self.iteration} "
                 f"(best acc@1 {self.best_top1:.3f})")
        if changes:
            self.apply_changes(changes)

    def check_changes(self, state, path):
        """The experiment and speed flags that differ from the checkpoint's; a UserError for an
        experiment flag unless the run was told to continue with it, or where no continuation can
        honour it."""
        changes = changed_flags(state, self.args, self.inputs)
        if "step1_checkpoint" in changes:
            old, new = changes["step1_checkpoint"]
            raise UserError(f"{path} was started from --step1_checkpoint {old}, not {new}: a resumed "
                            f"run goes on from its own weights and cannot start again from others; "
                            f"pass the same file, or a new --save to start a new run")
        if "optimizer" in changes:
            raise UserError(f"{path} was trained with --optimizer {changes['optimizer'][0]}, whose "
                            f"state cannot continue as {changes['optimizer'][1]}: pass a new --save")
        experiment = {flag: pair for flag, pair in changes.items() if flag in EXPERIMENT_FLAGS}
        if experiment and not self.args.resume_with_changes:
            raise UserError(f"{path} was trained with other flags: {describe_changes(experiment)}; "
                            f"pass a new --save to start a new experiment, or --resume_with_changes "
                            f"to continue this run with the new values")
        if "batch_size" in changes and state["iteration"]:
            raise UserError(f"{path} stopped inside an epoch, which cannot continue with another "
                            f"--batch_size: finish the epoch with --batch_size "
                            f"{changes['batch_size'][0]} or pass a new --save")
        return changes

    def apply_changes(self, changes):
        """Continues with the new learning rate, weight decay and schedule length, as if the
        schedule had always had them; data, teacher, size, seed and the speed flags are already
        built from the new flags. The change is kept in every later checkpoint and logged."""
        base = self.args.learning_rate
        rate = base * optim.learning_rate_factor(self.scheduler.last_epoch, self.args.epochs,
                                                 self.recipe.schedule, base)
        self.scheduler.base_lrs = [base] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = base, rate
        self.optimizer.param_groups[1]["weight_decay"] = self.args.weight_decay
        self.flag_changes.append({"epoch": self.epoch, "iteration": self.iteration,
                                  "changes": {flag: list(pair) for flag, pair in changes.items()}})
        self.log(f"=> continuing with changed flags: {describe_changes(changes)}")

    def non_finite_tensors(self):
        """Names of the weights, buffers and optimizer state tensors that hold a NaN or an infinity."""
        tensors = dict(self.student.state_dict())
        for index, state in self.optimizer.state_dict()["state"].items():
            tensors.update({f"optimizer state {index} {key}": value for key, value in state.items()
                            if torch.is_tensor(value)})
        return [name for name, tensor in tensors.items()
                if tensor.is_floating_point() and not torch.isfinite(tensor).all()]

    def diverged(self, what):
        """The UserError for a run whose numbers became NaN or infinite: ``what`` happened, what the
        run folder keeps and what to do. Every rank holds the same values, so all raise it together."""
        lower = "a lower --learning_rate or --weight_decay"
        if self.args.amp != "none":
            lower += ", or without --amp"
        if self.saved_at is None:
            return UserError(f"{what}; {self.save_dir} holds no checkpoint of this run: start it "
                             f"again with {lower}")
        return UserError(f"{what}; the checkpoint in {self.save_dir} (epoch {self.saved_at[0]} "
                         f"iteration {self.saved_at[1]}) is kept: resume it with --resume_with_changes "
                         f"and {lower}")

    def save(self, is_best=False, together=True):
        """Writes the checkpoint (on the main process), unless it could not be resumed. With
        ``together`` False no collective is run: the other processes may be inside one already (a
        run whose data stopped coming on this process alone)."""
        non_finite = self.non_finite_tensors()
        if non_finite:
            raise self.diverged(f"the weights or optimizer state became NaN or infinite by epoch "
                                f"{self.epoch} iteration {self.iteration} ({len(non_finite)} tensors, "
                                f"first {non_finite[0]}); not saved")
        if self.ctx.is_main:
            self.folder_lock.verify()
            run_folder.save(self.state_dict(), self.save_dir, is_best)
        self.saved_at = (self.epoch, self.iteration)
        if together:
            distributed.barrier(self.ctx)

    def save_progress(self, together=True):
        """Saves the last finished iteration where the run folder does not hold it yet; returns
        the checkpoint's path, or None where this run has trained nothing to save.

        At iteration 0 of an epoch nothing of the epoch was trained, and the checkpoint of the
        epoch before (written as it ended) already holds the run; one written now would hold the
        schedule stepped for the epoch that has not started, and a resume would step it again.
        """
        if self.saved_at != (self.epoch, self.iteration) and self.iteration:
            self.save(together=together)
        return os.path.join(self.save_dir, run_folder.LAST) if self.saved_at else None

    def ended_waiting(self, error):
        """The UserError for a run whose data stopped coming (``error``, a DataStopped: a batch that
        never came, a loader worker that died), after saving the last finished iteration.

        Under torchrun the other processes may be waiting inside a collective: none is run. A
        process other than the main one has nothing to save; the run folder keeps its checkpoint.
        """
        path = self.save_progress(together=False) if self.ctx.is_main else None
        if path:
            return UserError(f"{error.what}; saved {path} at epoch {self.epoch} iteration "
                             f"{self.iteration}: {error.fix}, then run the same command to resume")
        if self.saved_at:
            return UserError(f"{error.what}; the run folder keeps its checkpoint of epoch {self.saved_at[0]} "
                             f"iteration {self.saved_at[1]}: {error.fix}, then run the same command to resume")
        return UserError(f"{error.what}; nothing of this run was trained, so nothing was saved: "
                         f"{error.fix}, then run the same command to start again")

    def fit(self):
        args = self.args
        if self.epoch >= args.epochs:
            self.log(f"=> {self.save_dir} already holds all {args.epochs} epochs; nothing to do")
            return
        with warnings.catch_warnings(), StopSignals(interrupt_waits=not self.ctx.distributed) as stop:
            # The schedule is stepped before the epoch's first optimizer step on purpose.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)`")
            while self.epoch < args.epochs:
                if self.iteration == 0:
                    self.scheduler.step()
                    if hasattr(self.student, "start_epoch"):  # the architecture's own schedule
                        self.student.start_epoch(self.epoch)
                self.log(f"learning_rate: {self.optimizer.param_groups[0]['lr']}")
                started = time.time()
                lr = self.optimizer.param_groups[0]["lr"]
                train = self.train_one_epoch(stop)
                distributed.broadcast_buffers(self.student, self.ctx)
                val = self.validate(stop)
                model_record = self.student.epoch_record() if hasattr(self.student, "epoch_record") else {}
                record = {"lr": lr, "epoch_time": time.time() - started, **model_record,
                          **{f"train_{k}": v for k, v in train.items()},
                          **{f"val_{k}": v for k, v in val.items()},
                          **(self.metrics.epoch_summary() if self.metrics else {})}
                self.metrics_log.epoch(self.epoch, record, self.student)
                self.epoch, self.iteration = self.epoch + 1, 0
                is_best = val["top1"] > self.best_top1
                self.best_top1 = max(self.best_top1, val["top1"])
                self.save(is_best)
                skipped = (f"; {self.unreadable_count} unreadable training images skipped so far"
                           if self.unreadable_count else "")
                state = "".join(f"; {name} {value:.6g}" for name, value in model_record.items())
                self.log(f"=> epoch {self.epoch - 1} done in {time.time() - started:.1f}s; "
                         f"best acc@1 {self.best_top1:.3f}{state}{skipped}")
                if stop.requested and self.epoch < args.epochs:
                    raise self.stopped(stop)

    def validate(self, stop):
        """The epoch's validation; a stop or an end of the data while it waits for a batch saves the
        epoch's trained iterations first (its validation runs again on resume)."""
        args = self.args
        try:
            return evaluate(self.student, self.data.val_loader, self.device, args.amp,
                            args.channels_last, self.log, args.print_freq, self.ctx,
                            args.max_unreadable_share, stop, args.data_timeout)
        except StopWhileWaiting:
            self.save_progress()
            raise self.stopped(stop) from None
        except DataStopped as error:
            raise self.ended_waiting(error) from None

    def arriving(self, batches):
        """The batches of ``batches`` (``StopSignals.guard``'s) until a stop cuts a wait short (the
        caller then sees ``stop.requested``), or the data stop coming (``ended_waiting``)."""
        try:
            yield from batches
        except StopWhileWaiting:
            return
        except DataStopped as error:
            raise self.ended_waiting(error) from None

    def batch_name(self):
        return f"the training batch at epoch {self.epoch} iteration {self.iteration}"

    def stopped(self, stop):
        return Stopped(stop.requested, self.epoch, self.iteration,
                       os.path.join(self.save_dir, run_folder.LAST) if self.saved_at else None)

    def train_one_epoch(self, stop):
        """Trains from ``self.iteration`` to the end of ``self.epoch``.

        Between iterations it writes a mid-epoch checkpoint every ``--save_every_iters``, and when a
        stop signal arrived it writes one and raises Stopped. A batch that does not come (a stuck or
        dead loader worker) ends the run the same way, with a UserError (``ended_waiting``).
        """
        args, loader = self.args, self.data.train_loader
        self.model.train()
        self.data.train_sampler.set_epoch(self.epoch, start=self.iteration * loader.batch_size)
        num_batches = self.iteration + len(loader)
        meters = Meters(time=("Time", ":6.3f"), data=("Data", ":6.3f"), loss=("Loss", ":.4e"),
                        top1=("Acc@1", ":6.2f"), top5=("Acc@5", ":6.2f"))
        progress = ProgressMeter(num_batches, meters, prefix=f"Epoch: [{self.epoch}]")
        self.running = {name: meters[name] for name in ("loss", "top1", "top5")}
        for name, (total, count) in self.resumed_sums.items():
            self.running[name].restore(total, count)
        self.resumed_sums = {}
        end, stopping = time.time(), False
        if self.metrics:
            self.metrics.start_epoch()
        # Hooks inside a compiled model would force recompilation, so saturation is sampled eagerly only.
        sample_saturation = self.metrics and not args.compile
        limit = UnreadableLimit(args.max_unreadable_share, self.log, self.ctx, "training images")
        batches = stop.guard(on_device(loader, self.device, args.channels_last), args.data_timeout)
        for batch, images in self.arriving(batches):
            i = self.iteration
            meters["data"].update(time.time() - end)
            limit.update(batch.unreadable, len(batch))
            self.unreadable_count += len(batch.unreadable)
            if images is None:
                raise unusable_batch(batch, "no readable image", self.batch_name(), self.ctx.world_size)
            target = batch.target.to(self.device, non_blocking=True)
            try:
                saturation = self.metrics.sample_saturation() if sample_saturation else contextlib.nullcontext()
                with saturation, refusing_a_batch_of_one(batch, self.batch_name(), self.ctx.world_size):
                    result = self.training_step(images, target, lambda: stop.requested)
            except NonFiniteLoss as e:
                raise self.diverged(f"the loss became non-finite ({e.loss}) at epoch {self.epoch} "
                                    f"iteration {i}; stopped before updating the weights") from None
            stopping = result.stop
            self.iteration += 1
            n = len(target)
            meters["loss"].update(result.loss, n)
            meters["top1"].update(100 * result.correct1 / n, n)
            meters["top5"].update(100 * result.correct5 / n, n)
            meters["time"].update(time.time() - end)
            if i % args.print_freq == 0 or i == num_batches - 1 or stopping:
                self.log(progress.line(i))
                self.metrics_log.iteration(self.epoch * num_batches + i, {
                    "loss": result.loss, "acc1": 100 * result.correct1 / n,
                    "acc5": 100 * result.correct5 / n, "lr": self.optimizer.param_groups[0]["lr"],
                    "images_per_s": n * self.ctx.world_size / meters["time"].val})
            if stopping or (args.save_every_iters and self.iteration % args.save_every_iters == 0
                            and self.iteration < num_batches):
                self.save()
            if stopping:
                break
            end = time.time()
        if stop.requested:
            if not stopping:  # the wait for data was cut short, or the loader broke off: save here
                self.save_progress()
            raise self.stopped(stop)
        return meters.averages("loss", "top1", "top5")


def main(step):
    """Entry point of both steps: ``step`` (1 or 2) picks the recipe's row and is recorded in every
    checkpoint, so a run folder is never resumed by the other step."""
    report_user_errors(train)(build_parser(step).parse_args(), step)


def train(args, step):
    trainer = Trainer(args, step)
    trainer.log(f"=> step {step}: {title_of(trainer.student)}, {trainer.num_classes} classes, "
                f"{len(trainer.data.train_set)} train / {len(trainer.data.val_set)} val images, "
                f"{trainer.ctx.world_size} process(es) on {trainer.device}")
    try:
        trainer.fit()
    except Stopped as stopped:
        trainer.log(f"=> {stopped}")
        sys.exit(128 + stopped.signum)
    finally:
        trainer.metrics_log.close()
        distributed.shutdown(trainer.ctx)
