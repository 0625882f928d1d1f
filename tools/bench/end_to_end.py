"""Training fed by the real loader: a generated JPEG folder, the repository's data pipeline with
each backend, and the step of one benchmarked configuration, timed together."""
import itertools
import time

import torch

from models import RunSpec
from utils.data import SeededSampler, make_loader, on_device, open_split

from .memory import synchronize


def time_fed_training(run, loader, iterations, warmup):
    """Runs ``warmup`` then ``iterations`` training steps of ``run`` on ``loader``'s batches.

    Returns:
        images/s, the share of the timed wall time spent waiting for the next batch, and the peak
        device memory of the timed steps (CUDA only, else None).
    """
    batches = itertools.chain.from_iterable(epochs(loader, run.device, run.variant.channels_last))
    for _ in range(warmup):
        feed(run, *next(batches))
    synchronize(run.device)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    waited, images = 0.0, 0
    started = time.perf_counter()
    for _ in range(iterations):
        before = time.perf_counter()
        batch, on_device_images = next(batches)
        waited += time.perf_counter() - before
        images += feed(run, batch, on_device_images)
    synchronize(run.device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(run.device) if run.device.type == "cuda" else None
    return {"images_per_s": images / elapsed, "data_wait_share": waited / elapsed, "peak_bytes": peak}


def epochs(loader, device, channels_last):
    """The loader's epochs one after another, each with its own shuffle, as training reads them:
    ``(batch, images on the device)``."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield on_device(loader, device, channels_last)


def feed(run, batch, images):
    """One training step of ``run`` on a batch, as the trainer takes it; returns its size."""
    run.step(images, batch.target.to(run.device, non_blocking=True))
    return len(batch)


def decode_options(args):
    """``(backend, JPEG decoder, share of the JPEGs decoded by PIL)`` of each way of decoding to
    measure: the ``gpu`` backend once per ``--jpeg_decoders`` and ``--cpu_decode_shares``; the
    decoder and the share are None where they mean nothing."""
    return [(backend, decoder, share) for backend in args.backends
            for decoder in (args.jpeg_decoders if backend == "gpu" else [None])
            for share in (args.cpu_decode_shares if backend == "gpu" else [None])]


def benchmark_end_to_end(bench, variants, folder, args, log):
    """Rows of fed training for each decode option and each of ``variants`` of one
    RecipeStepBenchmark."""
    rows = []
    pin = bench.device.type == "cuda"
    for backend, decoder, share in decode_options(args):
        dataset = open_split(folder, "train", RunSpec(arch=args.arch, image_size=args.image_size), backend,
                             cpu_decode_share=share or 0.0, jpeg_decoder=decoder)
        loader = make_loader(dataset, SeededSampler(len(dataset), args.seed), args.batch_size,
                             args.end_to_end_workers, pin)
        for variant in variants:
            if variant not in bench.runs:
                continue
            log(f"step {bench.step}: end to end, {backend} backend (decoder {decoder}, PIL share {share}), "
                f"{variant.name}")
            measured = time_fed_training(bench.runs[variant], loader, args.end_to_end_iterations,
                                         args.warmup)
            rows.append({"step": bench.step, "config": variant.name, "backend": backend,
                         "jpeg_decoder": decoder, "cpu_decode_share": share,
                         "workers": args.end_to_end_workers, **measured})
        del loader  # stops its workers
    return rows
