"""Images/s of the training data pipeline alone, for several worker counts."""
import statistics
import tempfile
import time

from utils.data import SeededImageFolder, SeededSampler, make_loader, train_transform

from .jpeg_folder import write_jpeg_folder

LOADER_WORKERS = (0, 1, 2)


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
