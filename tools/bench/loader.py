"""Images/s of the data pipeline's workers alone, for each backend and worker count."""
import statistics

from models import RunSpec
from utils.data import SeededSampler, images_per_second, make_loader, open_split


def benchmark_loader(folder, args, log):
    """Loader-only rows over ``folder/train``, timed in interleaved rounds (one epoch each).

    The workers' output is not sent to a device: ``pil`` rows time decoding, cropping and
    flipping; ``gpu`` rows time what that backend leaves to the CPU (reading the file, its header
    and drawing the augmentation).
    """
    loaders = {}
    for backend in args.backends:
        dataset = open_split(folder, "train", RunSpec(image_size=args.loader_image_size), backend)
        for workers in args.loader_workers:
            loaders[backend, workers] = make_loader(dataset, SeededSampler(len(dataset), args.seed),
                                                    args.batch_size, workers, pin_memory=False)
    order = list(loaders)
    rates = {key: [] for key in order}
    # Epoch 0 starts the persistent workers and warms the file cache; it is not timed.
    for epoch in range(args.repeats + 1):
        log(f"loader: epoch {epoch} ({'warm-up' if epoch == 0 else 'timed'})")
        shift = epoch % len(order)
        for key in order[shift:] + order[:shift]:
            rate = images_per_second(loaders[key], epoch)
            if epoch:
                rates[key].append(rate)
    del loaders  # stops the workers while the folder still exists
    return [{"backend": backend, "workers": workers, "images_per_s": statistics.median(rates[backend, workers]),
             "images_per_s_per_worker": statistics.median(rates[backend, workers]) / max(workers, 1),
             "images_per_s_rounds": rates[backend, workers]} for backend, workers in order]
