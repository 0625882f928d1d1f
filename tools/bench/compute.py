"""Timing the training iteration of each Variant on a fixed synthetic batch, in interleaved
rounds, with the memory of one iteration; one RecipeStepBenchmark per AdamBNN step."""
import copy
import gc
import statistics
import time

import torch
import torchvision

from models import RunSpec, build_model
from models.layers import set_binarizers, use_deterministic_pooling
from models.ops import trace_layers
from utils.recipe import ADAMBNN
from utils.monitor import PaperMetrics
from utils.optim import build_optimizer
from utils.runtime import set_deterministic, to_device
from utils.training_step import TrainingStep

from .end_to_end import benchmark_end_to_end
from .memory import allocated_peak, resident_growth, synchronize
from .variants import Variant, parse_variant

SLOW_FACTOR = 4  # a flag this many times slower than ours in the probe is not timed again


class TrainingRun:
    """A student, its optimizer and the batch it trains on, set up for one Variant.

    ``iteration()`` is training's own step (utils.training_step.TrainingStep) on a fixed batch:
    forward under autocast, teacher logits under inference mode, distillation loss, backward, the
    loss and top-k counts read back to the host, the non-finite check, the optimizer step, and with
    ``metrics`` the flip-flop bookkeeping that training does after each step unless --no_metrics.
    """

    def __init__(self, variant, student, teachers, images, target, device, weight_decay=0.0):
        self.variant, self.device, self.target = variant, device, target
        self.amp = "bf16" if variant.bf16 else "none"
        self.student = copy.deepcopy(student)
        if variant.published:
            set_binarizers(self.student, "published", "published")
        if variant.channels_last:
            self.student.to(memory_format=torch.channels_last)
        if variant.deterministic and device.type == "cuda":
            use_deterministic_pooling(self.student)  # as --deterministic trains
        self.teacher = teachers[variant.channels_last, variant.compile]
        self.images = to_device(images, device, variant.channels_last)
        self.optimizer = build_optimizer(self.student, ADAMBNN.learning_rates["adam"], weight_decay,
                                         variant.fused_adam)
        self.model = torch.compile(self.student) if variant.compile else self.student
        self.model.train()
        self.paper_metrics = PaperMetrics(self.student) if variant.metrics else None
        self.training_step = TrainingStep(
            self.model, self.teacher, self.optimizer, device, self.amp,
            after_update=self.paper_metrics.after_step if self.paper_metrics else None)

    def iteration(self):
        """One training iteration; returns the loss."""
        return self.step(self.images, self.target).loss

    def step(self, images, target):
        """The training step on a batch, under this variant's kernel settings."""
        if self.device.type != "cuda":
            return self.training_step(images, target)
        set_deterministic(self.variant.deterministic)
        try:
            return self.training_step(images, target)
        finally:
            set_deterministic(False)

    def time(self, iterations):
        """Images per second of ``iterations`` iterations: {"wall": by the clock, "cpu": by the
        CPU time of this process, which other work on a shared machine inflates less}."""
        synchronize(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(iterations):
            self.iteration()
        synchronize(self.device)
        images = iterations * len(self.target)
        return {"wall": images / (time.perf_counter() - wall), "cpu": images / (time.process_time() - cpu)}

    def memory(self):
        """{"peak", "saved", "rss"} in bytes for one iteration (see memory.NOTES); None where
        unmeasurable. Runs two iterations."""
        persistent = {t.untyped_storage().data_ptr()
                      for t in [*self.student.parameters(), *self.student.buffers()]}
        saved = {}

        def pack(tensor):
            # Keep only numbers: holding the tensor here would keep it alive past backward.
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in persistent:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        def measured():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                return resident_growth(self.iteration)[1]

        # One iteration serves all three measures: the hooks and the profiler allocate no
        # tensors, and the profiler's own records stay far below a MiB.
        rss, peak = allocated_peak(self.iteration, measured, self.device)
        return {"peak": peak, "saved": sum(saved.values()), "rss": rss}


def device_supports(variant, device):
    """None if ``variant`` can run on ``device``, else the reason it cannot."""
    if variant.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "no bf16 on this GPU"
    return None


class RecipeStepBenchmark:
    """All configurations of one AdamBNN step, sharing one initial student, teacher and batch."""

    def __init__(self, args, step, device, log):
        self.args, self.step, self.device, self.log = args, step, device, log
        torch.manual_seed(args.seed)
        self.student = build_model(RunSpec(arch=args.arch, num_classes=args.num_classes, step=step)).to(device)
        teacher = torchvision.models.get_model(args.teacher, weights=None, num_classes=args.num_classes)
        teacher = teacher.to(device).eval().requires_grad_(False)
        nhwc = copy.deepcopy(teacher).to(memory_format=torch.channels_last)
        # Keyed by (channels_last, compile): --compile compiles the teacher too.
        self.teachers = {(False, False): teacher, (True, False): nhwc,
                         (False, True): torch.compile(teacher), (True, True): torch.compile(nhwc)}
        self.flops_per_image = training_flops_per_image(self.student, teacher, args.image_size)
        self.images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        self.target = torch.randint(args.num_classes, (args.batch_size,), device=device)
        self.runs, self.failures, self.probe, self.fastest = {}, {}, {}, None

    def add(self, variant):
        """Builds and warms up ``variant``; a speed flag the device cannot run is recorded, not raised."""
        if variant in self.runs or variant in self.failures:
            return
        reason = device_supports(variant, self.device)
        if reason is None:
            self.log(f"step {self.step}: warming up {variant.name}")
            run = TrainingRun(variant, self.student, self.teachers, self.images, self.target,
                              self.device, ADAMBNN.weight_decays[self.step])
            try:
                for _ in range(self.args.warmup):
                    run.iteration()
            except Exception as e:  # compilers and kernels fail in too many ways to list
                if variant in (Variant(), Variant(published=True)):
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        if reason is None:
            self.runs[variant] = run
        else:
            self.log(f"step {self.step}: {variant.name} skipped ({reason})")
            self.failures[variant] = reason

    def choose_fastest(self):
        """Ours with every speed flag whose single-flag configuration beat ``ours`` in a probe.

        The probe runs once per step, so that every table of the report uses the same choice. It
        times each single-flag configuration between two passes of ``ours`` and
        compares it with their mean, so a change of load during the probe cancels out. A
        configuration under 1/SLOW_FACTOR of ours in the probe is not timed again: its probe
        stands for it, which bounds the run time where a flag has no fast kernels on the device
        (bf16 without bf16 hardware).
        """
        if self.fastest is not None:
            return self.fastest
        ours = Variant()
        self.add(ours)
        singles = {flag: ours.with_flags([flag]) for flag in self.args.fastest_from}
        for variant in singles.values():
            self.add(variant)
        self.log(f"step {self.step}: probe")
        before = self.runs[ours].time(self.args.steps)
        for variant in [c for c in singles.values() if c in self.runs]:
            timing = self.runs[variant].time(self.args.steps)
            after = self.runs[ours].time(self.args.steps)
            self.probe[variant] = dict(timing, ratio=2 * timing["wall"] / (before["wall"] + after["wall"]))
            before = after
        self.fastest = ours.with_flags([flag for flag, variant in singles.items()
                                        if variant in self.probe and self.probe[variant]["ratio"] > 1])
        self.log(f"step {self.step}: fastest combination {self.fastest.name} (probe, x ours: "
                 + ", ".join(f"{c.name} {v['ratio']:.2f}" for c, v in self.probe.items()) + ")")
        self.add(self.fastest)
        return self.fastest

    def is_probe_only(self, variant):
        return variant in self.probe and self.probe[variant]["ratio"] * SLOW_FACTOR < 1

    def measure(self, variants):
        """Memory, then interleaved timing rounds; returns one result dict per configuration."""
        measured = [variant for variant in variants if variant in self.runs]
        memory = {}
        for variant in measured:
            self.log(f"step {self.step}: memory of {variant.name}")
            memory[variant] = self.runs[variant].memory()
        rounds = {variant: [self.probe[variant]] for variant in measured if self.is_probe_only(variant)}
        order = [variant for variant in measured if variant not in rounds]
        rounds.update({variant: [] for variant in order})
        for index in range(self.args.repeats):
            self.log(f"step {self.step}: timing round {index + 1}/{self.args.repeats}")
            shift = index % len(order)
            for variant in order[shift:] + order[:shift]:
                rounds[variant].append(self.runs[variant].time(self.args.steps))
        return [self.result(variant, rounds.get(variant), memory.get(variant)) for variant in variants]

    def result(self, variant, rounds, memory):
        row = {"step": self.step, "config": variant.name, "fastest": variant == self.fastest,
               "skipped": self.failures.get(variant), "probe_only": self.is_probe_only(variant)}
        if rounds:
            for clock, key in [("wall", "images_per_s"), ("cpu", "images_per_cpu_s")]:
                rates = [timing[clock] for timing in rounds]
                row.update({key: statistics.median(rates), f"{key}_rounds": rates})
            # CPU seconds per second: about the thread count when the process had the machine to
            # itself, less when other work took its share.
            row["cores"] = statistics.median(timing["wall"] / timing["cpu"] for timing in rounds)
            row.update({f"{key}_bytes": value for key, value in memory.items()})
        return row


def add_ratios(rows, baselines=None):
    """Adds throughput and memory ratios against the baseline row of the same step in
    ``baselines`` (by default ``rows`` themselves)."""
    baselines = {row["step"]: row for row in (rows if baselines is None else baselines)
                 if row["config"] == "baseline" and "images_per_s" in row}
    for row in rows:
        base = baselines.get(row["step"])
        for key, ratio in [("images_per_s", "speedup"), ("images_per_cpu_s", "cpu_speedup"),
                           ("peak_bytes", "peak_ratio"), ("saved_bytes", "saved_ratio")]:
            if base and row.get(key) is not None and base.get(key):
                row[ratio] = row[key] / base[key]


def training_flops_per_image(student, teacher, image_size):
    """Floating-point operations of one training image: 2 per multiply-accumulate of the student's
    convolutions and fc, three times (forward, input gradient, weight gradient), and of the
    teacher's forward. Binary convolutions count at full price, since training runs them as float
    convolutions of +-1 values; elementwise layers are not counted."""
    def macs(model):
        return sum(row["macs"] for row in trace_layers(model, image_size))
    return 2 * (3 * macs(student) + macs(teacher))


def resolve(bench, names):
    """The Variants of ``names`` for ``bench``, each built and warmed up once; ``fastest`` probes."""
    variants = []
    for name in names:
        variant = bench.choose_fastest() if name == "fastest" else parse_variant(name)
        bench.add(variant)
        if variant not in variants:
            variants.append(variant)
    return variants


def benchmark_training(args, device, log, folder=None):
    """Rows of every requested configuration for every requested AdamBNN step, on a synthetic
    batch; with a JPEG ``folder``, also the rows of training fed by the loader from it.

    Returns:
        (compute-only rows, fed rows).
    """
    rows, fed = [], []
    for step in sorted(set(args.recipe_steps)):
        bench = RecipeStepBenchmark(args, step, device, log)
        rows += [dict(row, flops_per_image=bench.flops_per_image)
                 for row in bench.measure(resolve(bench, args.configs))]
        if folder is not None:
            fed += benchmark_end_to_end(bench, resolve(bench, args.end_to_end_configs), folder, args, log)
        # Free this step's students and compiled graphs before building the next step's.
        del bench
        gc.collect()
        torch._dynamo.reset()
    add_ratios(rows)
    add_ratios(fed, baselines=rows)
    return rows, fed
