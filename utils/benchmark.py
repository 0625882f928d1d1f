"""Training and data-loading throughput of ReActNet-A: the published binarizers against ours.

For each AdamBNN training step (1: binary activations, 2: binary activations and weights) it times
full training iterations (student forward and backward, teacher forward under inference mode,
distillation loss, Adam step) on a fixed synthetic batch, for these configurations:

- ``baseline``: the published binarizers (utils/baseline.py), fp32, contiguous, for-loop/foreach Adam;
- ``ours``: this repository's binarizers with the default training flags (fp32), without the
  paper's measurements (as ``--no_metrics``);
- ``ours+metrics``: ``ours`` plus the flip-flop bookkeeping that training runs after every step by
  default, so the two rows give the measurements' cost;
- ``ours+bf16``, ``ours+channels_last``, ``ours+fused_adam``, ``ours+compile``: one speed flag each,
  as ``--amp bf16``, ``--channels_last``, ``--fused_optimizer`` and ``--compile`` set it in training;
- ``fastest``: ours with every flag that beat ``ours`` alone in a first timed pass, measured again.

Any ``ours+FLAG+FLAG...`` combination may be named with ``--configs``. The configurations are
timed in interleaved rounds (the order rotates every round) so that a machine shared with other
work slows all of them alike; the table reports medians. Memory is measured on extra iterations,
three ways (see ``MEMORY_NOTES``). ``--loader`` adds the images/s of the
ImageNet training transforms on generated JPEG files for 0, 1 and 2 data-loading workers. On a CPU,
freed memory is kept for reuse as CPU training keeps it (``utils.engine.keep_freed_host_memory``);
``--return_freed_memory`` measures with glibc's defaults instead.

    python utils/benchmark.py --image_size 64 --batch_size 32 --loader
    python utils/benchmark.py --device cuda --image_size 224 --batch_size 256

On a CPU shared with other work, set OMP_WAIT_POLICY=PASSIVE (or pass --threads 1): by default
OpenMP threads spin at the end of every parallel region waiting for their siblings, and when a
sibling has been descheduled the spinning makes a training step several times slower, by amounts
that depend on the load rather than on the configuration.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

# Kineto, the profiler behind the CPU memory measurement, prints its start-up chatter on stderr
# unless told otherwise before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import reactnet  # noqa: E402
from utils.baseline import use_published_binarizers  # noqa: E402
from utils.config import OneLineErrorParser  # noqa: E402
from utils.data import (MIN_IMAGE_SIZE, SeededImageFolder, SeededSampler, make_loader,  # noqa: E402
                        train_transform)
from utils.distill import distillation_loss  # noqa: E402
from utils.engine import autocast, build_optimizer, keep_freed_host_memory, to_device  # noqa: E402
from utils.meters import topk_correct  # noqa: E402
from utils.monitor import PaperMetrics  # noqa: E402

SPEED_FLAGS = ("bf16", "channels_last", "fused_adam", "compile")
# Not a speed flag: the paper's per-iteration flip-flop bookkeeping, on in training by default.
FLAGS = (*SPEED_FLAGS, "metrics")
DEFAULT_CONFIGS = ["baseline", "ours", "ours+metrics", *(f"ours+{flag}" for flag in SPEED_FLAGS), "fastest"]
LOADER_WORKERS = (0, 1, 2)
SLOW_FACTOR = 4
LEARNING_RATE = 1.25e-3
WEIGHT_DECAY = {1: 5e-6, 2: 0.0}  # the recipe's, per step: decay costs an extra op per conv weight
MiB = 2 ** 20
MEASURED = "benchmark: measured iteration"

MEMORY_NOTES = {
    "peak": "peak MiB = most tensor memory allocated during one iteration above what was held "
            "before it (CUDA: max_memory_allocated; CPU: the allocator's events recorded by "
            "torch.profiler with profile_memory)",
    "saved": "saved MiB = tensors saved for backward (torch.autograd.graph.saved_tensors_hooks; "
             "distinct storages, parameters and buffers excluded): the activation memory, "
             "deterministic",
    "rss": "RSS MiB = growth of the host's peak resident set during one iteration (Linux VmHWM "
           "reset through /proc/self/clear_refs after malloc_trim); includes allocator slack and "
           "library scratch buffers",
}


@dataclasses.dataclass(frozen=True)
class Config:
    """One way of running the training iteration."""

    published: bool = False
    bf16: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    metrics: bool = False

    @property
    def name(self):
        if self.published:
            return "baseline"
        return "+".join(["ours"] + [flag for flag in FLAGS if getattr(self, flag)])

    def with_flags(self, flags):
        return dataclasses.replace(self, **{flag: True for flag in flags})


def parse_config(text):
    """``baseline``, ``ours`` or ``ours+FLAG+...`` (FLAG from FLAGS) as a Config."""
    if text == "baseline":
        return Config(published=True)
    head, *flags = text.split("+")
    unknown = [flag for flag in flags if flag not in FLAGS]
    if head != "ours" or unknown:
        raise ValueError(f"unknown configuration '{text}': use baseline, fastest, ours or "
                         f"ours+FLAG[+FLAG...] with FLAG among {', '.join(FLAGS)}")
    return Config().with_flags(flags)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainingRun:
    """A student, its optimizer and the batch it trains on, set up for one Config.

    ``iteration()`` is the body of ``Trainer.train_one_epoch`` on a fixed batch: forward under
    autocast, teacher logits under inference mode, distillation loss, backward, the top-k counts
    read back to the host (the per-iteration synchronisation of training), Adam step, and with
    ``metrics`` the flip-flop bookkeeping that training does after each step unless --no_metrics.
    """

    def __init__(self, config, student, teachers, images, target, device, weight_decay=0.0):
        self.config, self.device, self.target = config, device, target
        self.amp = "bf16" if config.bf16 else "none"
        self.student = copy.deepcopy(student)
        if config.published:
            use_published_binarizers(self.student)
        if config.channels_last:
            self.student.to(memory_format=torch.channels_last)
        self.teacher = teachers[config.channels_last]
        self.images = to_device(images, device, config.channels_last)
        self.optimizer = build_optimizer(self.student, LEARNING_RATE, weight_decay, config.fused_adam)
        self.model = torch.compile(self.student) if config.compile else self.student
        self.model.train()
        self.paper_metrics = PaperMetrics(self.student) if config.metrics else None

    def iteration(self):
        """One training iteration; returns the loss (detached)."""
        with autocast(self.device, self.amp):
            logits = self.model(self.images)
            with torch.inference_mode():
                teacher_logits = self.teacher(self.images)
        loss = distillation_loss(logits, teacher_logits.clone())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        correct1, correct5 = topk_correct(logits.detach(), self.target)
        torch.stack([loss.detach(), correct1, correct5]).tolist()
        self.optimizer.step()
        if self.paper_metrics:
            self.paper_metrics.after_step()
        return loss.detach()

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
        """{"peak", "saved", "rss"} in bytes for one iteration (see MEMORY_NOTES); None where
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


def allocated_peak(prepare, run, device):
    """Calls ``prepare()`` then ``run()``; returns the result of ``run()`` and the most tensor bytes
    allocated while it ran, above the amount allocated when it started."""
    if device.type == "cuda":
        prepare()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    # The profiler does not see the release of a block allocated before it started, so prepare()
    # runs under it too: every block that run() releases was then allocated under its eyes.
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        prepare()
        with torch.profiler.record_function(MEASURED):
            result = run()
    events = list(profiler.profiler.kineto_results.events())
    window = next(e for e in events if e.name() == MEASURED)
    start, end = window.start_ns(), window.start_ns() + window.duration_ns()
    # Each allocator event carries +bytes (allocation) or -bytes (release): their running sum in
    # time order is the allocated amount, relative to the start of prepare().
    memory = sorted((e for e in events if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = at_start = peak = 0
    for event in memory:
        if event.start_ns() > end:
            break
        live += event.nbytes()
        if event.start_ns() < start:
            at_start = peak = live
        else:
            peak = max(peak, live)
    return result, peak - at_start


def resident_growth(run):
    """Runs ``run()``; returns its result and how far the peak resident set size rose above the
    size before it (None where the kernel does not let a process reset its peak: not Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        # Hand memory freed earlier back to the system, so the growth starts from what is in use.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident size, to the current size
    except OSError:
        before = None
    result = run()
    return result, None if before is None else (_status_kib("VmHWM") - before) * 1024


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def device_supports(config, device):
    """None if ``config`` can run on ``device``, else the reason it cannot."""
    if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "no bf16 on this GPU"
    return None


class RecipeStepBenchmark:
    """All configurations of one AdamBNN step, sharing one initial student, teacher and batch."""

    def __init__(self, args, step, device, log):
        self.args, self.step, self.device, self.log = args, step, device, log
        torch.manual_seed(args.seed)
        self.student = reactnet(args.num_classes, binary_weights=step == 2).to(device)
        teacher = torchvision.models.get_model(args.teacher, weights=None, num_classes=args.num_classes)
        teacher = teacher.to(device).eval().requires_grad_(False)
        self.teachers = {False: teacher,
                         True: copy.deepcopy(teacher).to(memory_format=torch.channels_last)}
        self.images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        self.target = torch.randint(args.num_classes, (args.batch_size,), device=device)
        self.runs, self.failures, self.probe, self.fastest = {}, {}, {}, None

    def add(self, config):
        """Builds and warms up ``config``; a speed flag the device cannot run is recorded, not raised."""
        if config in self.runs or config in self.failures:
            return
        reason = device_supports(config, self.device)
        if reason is None:
            self.log(f"step {self.step}: warming up {config.name}")
            run = TrainingRun(config, self.student, self.teachers, self.images, self.target,
                              self.device, WEIGHT_DECAY[self.step])
            try:
                for _ in range(self.args.warmup):
                    run.iteration()
            except Exception as e:  # compilers and kernels fail in too many ways to list
                if config in (Config(), Config(published=True)):
                    raise
                reason = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        if reason is None:
            self.runs[config] = run
        else:
            self.log(f"step {self.step}: {config.name} skipped ({reason})")
            self.failures[config] = reason

    def choose_fastest(self):
        """Ours with every speed flag whose single-flag configuration beat ``ours`` in a probe.

        The probe times each single-flag configuration between two passes of ``ours`` and
        compares it with their mean, so a change of load during the probe cancels out. A
        configuration under 1/SLOW_FACTOR of ours in the probe is not timed again: its probe
        stands for it, which bounds the run time where a flag has no fast kernels on the device
        (bf16 without bf16 hardware).
        """
        ours = Config()
        self.add(ours)
        singles = {flag: ours.with_flags([flag]) for flag in self.args.fastest_from}
        for config in singles.values():
            self.add(config)
        self.log(f"step {self.step}: probe")
        before = self.runs[ours].time(self.args.steps)
        for config in [c for c in singles.values() if c in self.runs]:
            timing = self.runs[config].time(self.args.steps)
            after = self.runs[ours].time(self.args.steps)
            self.probe[config] = dict(timing, ratio=2 * timing["wall"] / (before["wall"] + after["wall"]))
            before = after
        self.fastest = ours.with_flags([flag for flag, config in singles.items()
                                        if config in self.probe and self.probe[config]["ratio"] > 1])
        self.log(f"step {self.step}: fastest combination {self.fastest.name} (probe, x ours: "
                 + ", ".join(f"{c.name} {v['ratio']:.2f}" for c, v in self.probe.items()) + ")")
        self.add(self.fastest)
        return self.fastest

    def is_probe_only(self, config):
        return config in self.probe and self.probe[config]["ratio"] * SLOW_FACTOR < 1

    def measure(self, configs):
        """Memory, then interleaved timing rounds; returns one result dict per configuration."""
        measured = [config for config in configs if config in self.runs]
        memory = {}
        for config in measured:
            self.log(f"step {self.step}: memory of {config.name}")
            memory[config] = self.runs[config].memory()
        rounds = {config: [self.probe[config]] for config in measured if self.is_probe_only(config)}
        order = [config for config in measured if config not in rounds]
        rounds.update({config: [] for config in order})
        for index in range(self.args.repeats):
            self.log(f"step {self.step}: timing round {index + 1}/{self.args.repeats}")
            shift = index % len(order)
            for config in order[shift:] + order[:shift]:
                rounds[config].append(self.runs[config].time(self.args.steps))
        return [self.result(config, rounds.get(config), memory.get(config)) for config in configs]

    def result(self, config, rounds, memory):
        row = {"step": self.step, "config": config.name, "fastest": config == self.fastest,
               "skipped": self.failures.get(config), "probe_only": self.is_probe_only(config)}
        if rounds:
            for clock, key in [("wall", "images_per_s"), ("cpu", "images_per_cpu_s")]:
                rates = [timing[clock] for timing in rounds]
                row.update({key: statistics.median(rates), f"{key}_rounds": rates})
            # CPU seconds per second: about the thread count when the process had the machine to
            # itself, less when other work took its share.
            row["cores"] = statistics.median(timing["wall"] / timing["cpu"] for timing in rounds)
            row.update({f"{key}_bytes": value for key, value in memory.items()})
        return row


def add_ratios(rows):
    """Adds throughput and memory ratios against the baseline row of the same step."""
    baselines = {row["step"]: row for row in rows if row["config"] == "baseline" and "images_per_s" in row}
    for row in rows:
        base = baselines.get(row["step"])
        for key, ratio in [("images_per_s", "speedup"), ("images_per_cpu_s", "cpu_speedup"),
                           ("peak_bytes", "peak_ratio"), ("saved_bytes", "saved_ratio")]:
            if base and row.get(key) is not None and base.get(key):
                row[ratio] = row[key] / base[key]


def benchmark_training(args, device, log):
    """Result rows of every requested configuration for every requested AdamBNN step."""
    rows = []
    for step in sorted(set(args.recipe_steps)):
        bench = RecipeStepBenchmark(args, step, device, log)
        configs = []
        for name in args.configs:
            config = bench.choose_fastest() if name == "fastest" else parse_config(name)
            bench.add(config)
            if config not in configs:
                configs.append(config)
        rows += bench.measure(configs)
        # Free this step's students and compiled graphs before building the next step's.
        del bench
        gc.collect()
        torch._dynamo.reset()
    add_ratios(rows)
    return rows


def write_jpeg_folder(root, count, seed=0, classes=10):
    """``count`` ImageNet-sized JPEG files (smooth random colour fields) in ``classes`` folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % classes}")
        os.makedirs(folder, exist_ok=True)
        width, height = int(rng.integers(400, 501)), int(rng.integers(300, 376))
        # Upsampled coarse noise plus a little fine noise compresses like a photograph, so decoding
        # costs about what it costs on ImageNet.
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BILINEAR), dtype=np.float32)
        pixels += rng.normal(0, 8, pixels.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{i}.jpg"), quality=90)


def benchmark_loader(args, log):
    """Images/s of the training data pipeline for each worker count, in interleaved rounds."""
    with tempfile.TemporaryDirectory() as root:
        log(f"loader: writing {args.loader_images} JPEG files")
        write_jpeg_folder(root, args.loader_images, args.seed)
        dataset = SeededImageFolder(root, transform=train_transform(args.loader_image_size))
        loaders = {}
        for workers in LOADER_WORKERS:
            sampler = SeededSampler(len(dataset), args.seed, shuffle=True)
            loaders[workers] = make_loader(dataset, sampler, args.batch_size, workers, pin_memory=False)
        rates = {workers: [] for workers in LOADER_WORKERS}
        # Epoch 0 starts the persistent workers and warms the file cache; it is not timed.
        for epoch in range(args.repeats + 1):
            log(f"loader: epoch {epoch} ({'warm-up' if epoch == 0 else 'timed'})")
            shift = epoch % len(LOADER_WORKERS)
            for workers in LOADER_WORKERS[shift:] + LOADER_WORKERS[:shift]:
                loader = loaders[workers]
                loader.sampler.set_epoch(epoch)
                started = time.perf_counter()
                count = sum(len(target) for _, target, _ in loader)
                if epoch:
                    rates[workers].append(count / (time.perf_counter() - started))
        del loaders  # stops the workers while the folder still exists
    return [{"workers": workers, "images_per_s": statistics.median(rates[workers]),
             "images_per_s_per_worker": statistics.median(rates[workers]) / max(workers, 1),
             "images_per_s_rounds": rates[workers]} for workers in LOADER_WORKERS]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    return f"{model} ({os.cpu_count()} logical CPUs, {torch.backends.cpu.get_cpu_capability()})"


def _mib(value):
    return "n/a" if value is None else f"{value / MiB:.1f}"


def _load(averages):
    return ", ".join(f"{value:.2f}" for value in averages)


def _ratio(value):
    return "n/a" if value is None else f"{value:.2f}"


def render(report):
    """The report as markdown."""
    meta = report["machine"]
    lines = ["# ReActNet-A training benchmark",
             "",
             f"- device: {meta['device']}; torch {meta['torch']}; threads: {meta['threads']}; "
             f"OMP_WAIT_POLICY: {meta['omp_wait_policy']}; freed host memory kept for reuse: "
             f"{'yes' if meta['keep_freed_host_memory'] else 'no'}",
             f"- load average (1, 5, 15 min): {_load(meta['load_before'])} before, "
             f"{_load(meta['load_after'])} after",
             f"- settings: image {meta['image_size']}, batch {meta['batch_size']}, "
             f"{meta['num_classes']} classes, teacher {meta['teacher']}, warm-up {meta['warmup']}, "
             f"{meta['repeats']} interleaved rounds of {meta['steps']} iterations (medians)",
             *[f"- {note}" for note in MEMORY_NOTES.values()]]
    if report["training"]:
        lines += ["- images/s: median of the rounds (range in parentheses); per CPU-s: images per "
                  "second of this process's CPU time, less sensitive to other work on the machine; "
                  "cores: CPU seconds per second (the thread count if nothing else ran)",
                  f"- fastest: ours with every flag that beat ours alone in a probe pass; * = "
                  f"slower than 1/{SLOW_FACTOR} of ours in the probe, so timed in the probe only",
                  "", "| config | step | images/s | x baseline | per CPU-s | x baseline | cores | "
                      "peak MiB | x baseline | saved MiB | x baseline | RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in report["training"]:
            name = f"fastest = {row['config']}" if row["fastest"] else row["config"]
            if row["skipped"]:
                lines.append(f"| {name} | {row['step']} | skipped: {row['skipped']} ||||||||||")
                continue
            rates = row["images_per_s_rounds"]
            mark = "*" if row["probe_only"] else ""
            lines.append(
                f"| {name} | {row['step']} | {row['images_per_s']:.2f}{mark} "
                f"({min(rates):.2f}-{max(rates):.2f}) | {_ratio(row.get('speedup'))} | "
                f"{row['images_per_cpu_s']:.2f} | {_ratio(row.get('cpu_speedup'))} | "
                f"{row['cores']:.2f} | "
                f"{_mib(row['peak_bytes'])} | {_ratio(row.get('peak_ratio'))} | "
                f"{_mib(row['saved_bytes'])} | {_ratio(row.get('saved_ratio'))} | "
                f"{_mib(row['rss_bytes'])} |")
    if report["loader"]:
        lines += ["", f"Data loading: ImageNet training transforms (RandomResizedCrop "
                      f"{meta['loader_image_size']}, lighting, flip, ToTensor, normalize) on "
                      f"{meta['loader_images']} generated JPEG files, batch {meta['batch_size']}",
                  "", "| workers | images/s | images/s per worker |", "|---|---|---|"]
        for row in report["loader"]:
            lines.append(f"| {row['workers']} | {row['images_per_s']:.1f} | "
                         f"{row['images_per_s_per_worker']:.1f} |")
    lines += ["", "On an H100, the 224x224 batch-256 row: python utils/benchmark.py --device cuda "
                  "--image_size 224 --batch_size 256 --teacher resnet34"]
    return "\n".join(lines)


def build_parser():
    parser = OneLineErrorParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Configurations: baseline, fastest, ours, ours+FLAG[+FLAG...] with FLAG among "
               + ", ".join(FLAGS) + " (metrics: the paper's per-iteration flip-flop bookkeeping).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to run; cuda when available if not given")
    parser.add_argument("--image_size", type=int, default=64, help="training crop of the synthetic batch")
    parser.add_argument("--batch_size", type=int, default=32, help="images per iteration (and per loader batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed iterations before measuring (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timing rounds (and timed loader epochs); medians are reported")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes of student and teacher")
    parser.add_argument("--teacher", default="resnet34", help="torchvision model name of the teacher")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="configurations to measure")
    parser.add_argument("--fastest_from", nargs="*", choices=SPEED_FLAGS, default=list(SPEED_FLAGS),
                        help="speed flags the fastest combination may use")
    parser.add_argument("--recipe_steps", type=int, nargs="*", choices=[1, 2], default=[1, 2],
                        help="AdamBNN steps to measure: 1 (real weights), 2 (binary weights); "
                             "none: only the loader")
    parser.add_argument("--return_freed_memory", action="store_true",
                        help="leave glibc's malloc at its defaults; without this flag a CPU benchmark "
                             "keeps freed memory for reuse, as CPU training does")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before measuring; torch's default if not given")
    parser.add_argument("--seed", type=int, default=0, help="seeds the models, the batch and the files")
    parser.add_argument("--loader", action="store_true",
                        help="also measure the data loader for 0, 1 and 2 workers")
    parser.add_argument("--loader_images", type=int, default=256, help="JPEG files the loader reads")
    parser.add_argument("--loader_image_size", type=int, default=224,
                        help="RandomResizedCrop size of the loader benchmark")
    parser.add_argument("--out", default=None,
                        help="also write the report to this file: JSON if it ends in .json, else markdown")
    return parser


def main(argv=None):
    """Runs the benchmark, prints the markdown report and returns it as a dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "warmup", "repeats", "batch_size", "loader_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.image_size < MIN_IMAGE_SIZE:
        parser.error(f"--image_size must be at least {MIN_IMAGE_SIZE}: ReActNet-A downsamples by 32")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no GPU")
    for name in args.configs:
        if name != "fastest":
            try:
                parse_config(name)
            except ValueError as e:
                parser.error(str(e))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in training
    kept_freed_memory = device.type == "cpu" and not args.return_freed_memory and keep_freed_host_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    training = benchmark_training(args, device, log)
    loader = benchmark_loader(args, log) if args.loader else []
    report = {
        "device_type": device.type,
        "machine": {"device": device_name(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                    "keep_freed_host_memory": kept_freed_memory,
                    "load_before": load_before,
                    "load_after": os.getloadavg(), **{k: getattr(args, k) for k in (
                        "image_size", "batch_size", "num_classes", "teacher", "warmup", "repeats",
                        "steps", "loader_images", "loader_image_size")}},
        "memory_notes": MEMORY_NOTES,
        "training": training,
        "loader": loader,
    }
    text = render(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump(report, f, indent=2)
            else:
                f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
