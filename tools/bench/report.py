"""The benchmark's report as markdown, and the name of the machine it ran on."""
import contextlib
import os
import platform

import torch

from models import RunSpec
from models.registry import get_architecture

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
    lines = [f"# {get_architecture(meta.get('arch', RunSpec.arch)).title} training benchmark",
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
                  f"- arithmetic: {report['training'][0]['flops_per_image'] / 1e9:.1f} GFLOP per "
                  f"training image of step {report['training'][0]['step']} (2 per multiply-accumulate "
                  f"of the student's convolutions and fc, forward and both gradients, and of the "
                  f"teacher's forward); TFLOP/s = images/s times that",
                  "", "| config | step | images/s | x baseline | per CPU-s | x baseline | cores | "
                      "peak MiB | x baseline | saved MiB | x baseline | RSS MiB | TFLOP/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
                f"{_mib(row['rss_bytes'])} | {row['images_per_s'] * row['flops_per_image'] / 1e12:.3g} |")
    if report["end_to_end"]:
        lines += ["", f"End to end: training steps fed by the real loader ({meta['end_to_end_workers']} "
                      f"workers) from {meta['loader_images']} generated JPEG files of ImageNet's size, "
                      f"{meta['end_to_end_iterations']} timed iterations; data wait = share of the wall "
                      f"time spent waiting for the next batch (the gpu backend's decoding runs in "
                      f"the step); decoder = the gpu backend's device JPEG decoder; PIL share = its "
                      f"share of the JPEG files decoded by PIL in the workers; x baseline = against "
                      f"the compute-only baseline row",
                  "", "| config | step | backend | decoder | PIL share | images/s | x baseline | data wait "
                      "| peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in report["end_to_end"]:
            share = "" if row["cpu_decode_share"] is None else f"{row['cpu_decode_share']:g}"
            lines.append(f"| {row['config']} | {row['step']} | {row['backend']} | {row['jpeg_decoder'] or ''} | "
                         f"{share} | "
                         f"{row['images_per_s']:.1f} | {_ratio(row.get('speedup'))} | "
                         f"{100 * row['data_wait_share']:.1f}% | {_mib(row['peak_bytes'])} |")
    if report["loader"]:
        lines += ["", f"Data loading alone: the workers' share of the pipeline (pil: decode, "
                      f"RandomResizedCrop {meta['loader_image_size']}, flip; gpu: file bytes, header "
                      f"and the drawn augmentation) on {meta['loader_images']} generated JPEG files, "
                      f"batch {meta['batch_size']}; lighting and normalisation run on the device",
                  "", "| backend | workers | images/s | images/s per worker |", "|---|---|---|---|"]
        for row in report["loader"]:
            lines.append(f"| {row['backend']} | {row['workers']} | {row['images_per_s']:.1f} | "
                         f"{row['images_per_s_per_worker']:.1f} |")
    lines += ["", "Every GPU figure of docs/speed.md, on a GPU machine: bash tools/measure_gpu.sh"]
    return "\n".join(lines)
