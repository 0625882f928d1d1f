"""The benchmark's report as markdown, and the name of the machine it ran on."""
import contextlib
import os
import platform

import torch

from .compute import SLOW_FACTOR
from .memory import NOTES

MiB = 2 ** 20


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
             *[f"- {note}" for note in NOTES.values()]]
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
    lines += ["", "On an H100, the 224x224 batch-256 row: python -m tools.benchmark --device cuda "
                  "--image_size 224 --batch_size 256 --teacher resnet34"]
    return "\n".join(lines)
