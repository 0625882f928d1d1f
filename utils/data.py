"""ImageNet-style data: the published transforms, seeded sampling and tolerant image loading.

Every random choice of an epoch (the order of the samples, the augmentation of each sample and, with
backend ``gpu``, whether PIL or the device decodes it) is a function of ``(seed, epoch, position in
the epoch)``. Nothing depends on which process or worker handles a sample, on how many batches ran
before or on the backend, which is what makes an interrupted run resume bit for bit, also in the
middle of an epoch.

Typical use::

    train_set = open_split(root, "train", spec, backend)
    sampler = SeededSampler(len(train_set), seed)
    for batch in make_loader(train_set, sampler, batch_size, workers, pin_memory=True):
        images = batch.to_device(device)  # None when no image of the batch was readable
        ...  # then batch.target, batch.unreadable, len(batch)
"""
import contextlib
import ctypes
import functools
import math
import os
import queue
import re
import resource
import signal
import threading
import time

import torch
from torchvision import datasets
from torchvision.datasets.folder import has_file_allowed_extension

from .errors import UserError
from .signals import DataStopped, StopSignals
from .pipeline import (BACKENDS, READ_ERRORS, Batch, UnreadableImage, jpeg_decoder_for, read_for_device,
                       read_with_pil)

# The share of the JPEG files that backend ``gpu`` leaves to PIL in the loader's workers. Which share
# fills the GPU depends on the CPU cores per GPU and awaits measurement (tools/measure_gpu.sh); until
# then the default keeps every decodable file on the device, as measured so far.
CPU_DECODE_SHARE = 0.0


class SeededImageFolder(datasets.ImageFolder):
    """An ImageFolder whose items are addressed as ``(index, seed)``.

    A sample is read with torch's CPU generator seeded by ``seed``, in a forked RNG, so its
    augmentation is fixed by its seed alone. A file that cannot be decoded yields an
    UnreadableImage instead of raising, so one corrupt JPEG does not end a run.

    Args:
        spec: the run's RunSpec: the size of the square images the model takes, and how they are
            resized, cropped and normalised.
        backend: ``"pil"`` (decode and crop in the worker) or ``"gpu"`` (decode and crop on the
            training device; see utils/pipeline.py).
        train: the training augmentation if True, else the validation transform.
        cpu_decode_share: with backend ``"gpu"``, the share of the samples whose JPEG PIL decodes
            in the worker, as the ``"pil"`` backend would (see ``decoded_by_pil``).
        jpeg_decoder: with backend ``"gpu"``, the library that decodes JPEGs on the device (a
            name in utils.pipeline.JPEG_DECODERS); by default the first that loads. The attribute
            holds the one chosen (None with ``"pil"``).
    """

    def __init__(self, root, spec, backend="pil", train=False, cpu_decode_share=CPU_DECODE_SHARE,
                 jpeg_decoder=None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown data backend {backend!r}, expected one of {BACKENDS}")
        self.jpeg_decoder = jpeg_decoder_for(backend, jpeg_decoder)
        super().__init__(root)
        self.spec, self.backend, self.train = spec, backend, train
        self.cpu_decode_share = cpu_decode_share

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """``(path, class index)`` of every image under ``directory/<class>/``, in ImageFolder's
        order, with each real folder entered once: a symlink loop or a second link to a folder
        adds no image twice. Links are followed otherwise, so a tree assembled from links works.
        """
        accept = is_valid_file or functools.partial(has_file_allowed_extension, extensions=extensions)
        samples, seen = [], set()
        class_folders = {}
        for name in sorted(class_to_idx):
            real = os.path.realpath(os.path.join(directory, name))
            if real in class_folders:
                raise UserError(f"the class folders '{class_folders[real]}' and '{name}' of {directory} "
                                f"are one folder ({real}) through a link: give each class its own images")
            class_folders[real] = name
        for name in sorted(class_to_idx):
            folders = sorted(walk_each_folder_once(os.path.join(directory, name), seen))
            for folder, real, _ in folders:
                refuse_other_class(folder, real, name, class_folders)
            found = [(os.path.join(folder, file), class_to_idx[name])
                     for folder, _, files in folders
                     for file in sorted(files) if accept(os.path.join(folder, file))]
            if not found and not allow_empty:
                raise FileNotFoundError(f"found no image in {os.path.join(directory, name)}")
            samples += found
        return samples

    def __getitem__(self, item):
        index, seed = item
        path, target = self.samples[index]
        try:
            with torch.random.fork_rng(devices=[]):
                # The transforms draw from the CPU generator alone; torch.manual_seed would also
                # queue a reseed of the CUDA generators, with a stack trace (0.2 ms a sample).
                torch.default_generator.manual_seed(seed)
                if self.backend == "gpu":
                    return read_for_device(path, target, self.spec, self.train, self.jpeg_decoder,
                                           decoded_by_pil(seed, self.cpu_decode_share))
                return read_with_pil(path, target, self.spec, self.train)
        except READ_ERRORS as error:
            return UnreadableImage.from_error(path, error)


def refuse_other_class(folder, real, name, class_folders):
    """A UserError if ``folder`` (real path ``real``), reached from class ``name``'s folder, is (or
    lies inside) another class's folder: through a link, that class's images would be labelled
    ``name``."""
    for other_real, other in class_folders.items():
        if other != name and (real == other_real or real.startswith(other_real + os.sep)):
            raise UserError(f"{folder} (in class folder '{name}') leads to {other_real}, the folder of "
                            f"class '{other}', through a link: its images would be counted as "
                            f"'{name}'; remove the link or give each class its own images")


def walk_each_folder_once(top, seen):
    """``(folder, its real path, file names)`` under ``top``, following links but entering no real
    folder that is in ``seen``, which collects the real folders entered."""
    for folder, subfolders, files in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders.clear()
            continue
        seen.add(real)
        subfolders.sort()  # which of two links to one folder is kept does not depend on the disk
        yield folder, real, files


def open_split(root, split, spec, backend="pil", train=None, class_to_idx=None,
               num_classes=None, cpu_decode_share=CPU_DECODE_SHARE, jpeg_decoder=None):
    """Opens ``root/split`` as a SeededImageFolder, or raises a UserError that says what is wrong.

    Args:
        spec: the run's RunSpec (models/spec.py): image size, resize, crop and normalisation.
        backend: ``"pil"`` or ``"gpu"``, where images are decoded and cropped.
        train: whether to apply the training augmentation; by default for the ``"train"`` split
            only.
        class_to_idx: the classes another split uses; this split must have the same ones.
        num_classes: the classes a model predicts; this split must have that many.
        cpu_decode_share: with backend ``"gpu"``, the share of the JPEGs decoded by PIL.
        jpeg_decoder: with backend ``"gpu"``, the device's JPEG decoder (default: the first that
            loads; see SeededImageFolder).
    """
    require_cpu_decode_share(cpu_decode_share)
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserError(f"no '{split}' folder at {folder}: --data must hold {split}/<class>/<image> "
                        f"(an ImageFolder tree)")
    try:
        dataset = SeededImageFolder(folder, spec, backend,
                                    split == "train" if train is None else train, cpu_decode_share,
                                    jpeg_decoder)
    except FileNotFoundError as e:
        raise UserError(f"{folder} holds no images in class folders ({e}); expected "
                        f"{split}/<class>/<image>") from None
    if class_to_idx is not None and dataset.class_to_idx != class_to_idx:
        mine, theirs = set(dataset.class_to_idx), set(class_to_idx)
        only_here = sorted(mine - theirs)[:5]
        only_there = sorted(theirs - mine)[:5]
        raise UserError(f"the class folders of {folder} differ from train's: only in {split}: "
                        f"{only_here or 'none'}; only in train: {only_there or 'none'}; "
                        f"make both splits hold the same class folders")
    if num_classes is not None and len(dataset.classes) != num_classes:
        raise UserError(f"the model predicts {num_classes} classes but {folder} has "
                        f"{len(dataset.classes)} class folders")
    return dataset


def require_classes(recorded, found, folder, source, fix):
    """A UserError unless ``found``, the class names of ``folder`` in label order, are ``recorded``,
    those ``source`` (a checkpoint, a teacher) was trained on: label k would otherwise mean another
    class to the model than to the data, and every accuracy and gradient would be silently wrong.

    The line names the first position that differs, what each side has there, and ``fix``.
    """
    recorded, found = list(recorded), list(found)
    if recorded == found:
        return
    k = next(i for i in range(max(len(recorded), len(found)))
             if i >= len(recorded) or i >= len(found) or recorded[i] != found[i])
    there = f"'{recorded[k]}'" if k < len(recorded) else "none"
    here = f"'{found[k]}'" if k < len(found) else "none"
    counts = (f" ({len(found)} classes here, {len(recorded)} classes there)"
              if len(found) != len(recorded) else "")
    missing = [name for name in recorded if name not in found]
    detail = f"; '{missing[0]}' has no class folder here" if missing else ""
    raise UserError(f"the class folders of {folder} are not the classes {source} was trained on, in "
                    f"label order{counts}: class {k} is {there} there but {here} here{detail}; {fix}")


# A WordNet ID, as ImageNet names its class folders (n01440764).
WNID = re.compile(r"n\d{8}")
IMAGENET_CLASSES = 1000


def imagenet_synsets():
    """ImageNet-1k's WordNet IDs in label order (sorted: n01440764 first), as timm lists them."""
    from timm.data import ImageNetInfo
    return list(ImageNetInfo().label_names())


def require_cpu_decode_share(share, flag="--cpu_decode_share"):
    """A UserError unless ``0 <= share <= 1``."""
    if not 0 <= share <= 1:
        raise UserError(f"{flag} must be in [0, 1], got {share}")


def mix_seed(*values):
    """A 63-bit seed mixed from integers (splitmix64 steps): cheap enough to call per sample."""
    mask = (1 << 64) - 1
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (value & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 27)) * 0x94D049BB133111EB & mask
        state ^= state >> 31
    return state >> 1


DECODER_DRAW = 1  # mixed into a sample's seed for the decoder's draw, apart from its augmentation


def decoded_by_pil(sample_seed, share):
    """Whether backend ``gpu`` leaves this sample's JPEG to PIL: true for a ``share`` of the seeds.

    A sample's seed is mixed from (seed, epoch, position), so the choice is the same in a resumed
    epoch and with any number of workers, processes or batch size, and no generator is drawn from.
    """
    return mix_seed(sample_seed, DECODER_DRAW) < share * 2 ** 63


class SeededSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)`` for this process's share of an epoch.

    Training (``shuffle=True``): a permutation drawn from ``(seed, epoch)``, padded by wrapping to a
    multiple of the world size, then rank ``r`` takes positions ``r, r + W, r + 2W, ...``, so the
    union of the ranks' k-th batches is the k-th batch of a single process with the global batch.
    Evaluation (``shuffle=False``): the dataset in order, split the same way without padding, so
    every sample is counted exactly once across ranks.

    ``start`` skips the first ``start`` samples of this rank's share (mid-epoch resume).

    Given this rank's ``batch_size``, a training share that would end in a batch of one sample
    loses that sample (a different one each epoch): BatchNorm cannot normalise a batch of one
    where the feature map is 1x1 (images under 64 pixels). The shares are equal, so every rank
    drops it, and the length, which resume and the schedule count with, already excludes it.
    """

    def __init__(self, size, seed=0, shuffle=True, rank=0, world_size=1, batch_size=None):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return max(0, self.share_size() - self.start)

    def share_size(self):
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world_size))
        share = math.ceil(self.size / self.world_size)
        if self.batch_size and self.batch_size > 1 and share % self.batch_size == 1:
            return share - 1
        return share

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
            padded = math.ceil(self.size / self.world_size) * self.world_size
            order = (order * math.ceil(padded / self.size))[:padded]
        else:
            order = list(range(self.size))
        positions = range(self.rank, len(order), self.world_size)
        for position in list(positions)[self.start:self.share_size()]:
            yield order[position], mix_seed(self.seed, self.epoch, position)


def make_loader(dataset, sampler, batch_size, workers, pin_memory):
    """A DataLoader over a SeededSampler with persistent, prefetching workers; it yields Batches."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=functools.partial(Batch, spec=dataset.spec), pin_memory=pin_memory,
        drop_last=False, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=ignore_stop_signals)


def start(loader):
    """``iter(loader)``, which starts its workers the first time (they persist), made to end well.

    A system that refuses the workers (the per-user process limit, ``ulimit -u``) is a UserError
    naming the limit. And a worker that dies (the out-of-memory killer) is noticed while the run
    waits for a batch, as a RuntimeError from the loader, never in the middle of a training step:
    the loader's own SIGCHLD handler, which would raise wherever the main thread happens to be (in
    an optimizer step, leaving half the weights updated), is taken out.
    """
    try:
        batches = iter(loader)
    except (OSError, RuntimeError) as error:
        if worker_death(error):  # a persistent worker, found dead as a new epoch starts
            raise worker_death(error) from None
        if not (isinstance(error, BlockingIOError) or "can't start new thread" in str(error)):
            raise
        # The loader's half-built iterator would fail again, and print it, as it is freed: the
        # workers it started end with this process (utils.errors.end_child_processes).
        frame = error.__traceback__
        while frame is not None:
            half_built = frame.tb_frame.f_locals.get("self")
            if isinstance(half_built, torch.utils.data.dataloader._MultiProcessingDataLoaderIter):
                half_built._shutdown = True
            frame = frame.tb_next
        soft, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else soft
        raise UserError(f"the system refused to start the data loader's {loader.num_workers} worker "
                        f"processes ({error}; this user may run at most {limit} processes and threads, "
                        f"ulimit -u): pass a smaller --workers") from None
    if loader.num_workers and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    return batches


# A loader worker that died, as the loader reports it once the run waits for its batch.
WORKER_DIED = re.compile(r"DataLoader worker \(pid\(s\) ([\d, ]+)\) exited unexpectedly")


class WorkerDied(DataStopped):
    """A loader worker ended while the run was waiting for its batch."""

    def __init__(self, pids):
        super().__init__(f"a data-loading worker (process {pids}) ended unexpectedly, most likely "
                         f"killed by the kernel's out-of-memory killer (see dmesg)",
                         "if memory is short, use fewer --workers or a smaller --batch_size")


def worker_death(error):
    """The WorkerDied that ``error``, raised by a loader, reports; None for any other error."""
    died = WORKER_DIED.search(str(error)) if isinstance(error, RuntimeError) else None
    return WorkerDied(died.group(1)) if died else None


def arrived(batches):
    """The items of ``batches`` (a loader's iterator), a worker's death reported as WorkerDied."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except RuntimeError as error:
            if worker_death(error) is None:
                raise
            raise worker_death(error) from None
        yield batch


def ignore_stop_signals(worker_id):
    """Prepares a loader worker: it ignores the stop signals and dies with its parent.

    A cluster scheduler (and Ctrl-C) signals every process of the job, the workers included; a worker
    that died of it would take the main process down before it saved. The main process alone decides
    to stop, and then ends its workers: by shutting the loader down, or on its way out
    (``utils.errors.end_child_processes``). If it is killed instead (SIGKILL, the OOM killer), nothing
    of it runs any more: the kernel's parent-death signal ends the workers then.
    """
    for signum in StopSignals.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent():
    """Has the kernel SIGKILL this process when the thread that started it ends (Linux); elsewhere,
    or if prctl is unavailable, the process relies on the loader's own checks of its parent.

    The signal follows the starting thread, not the process: loaders are iterated in the main
    thread (see ``on_device``) so that their workers are started there.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def on_device(loader, device, channels_last=False, ahead=None):
    """Yields ``(batch, images)`` for each Batch of ``loader``, with ``images = batch.to_device(...)``.
    A loader worker that died is reported as WorkerDied once its batch is waited for (``start``).

    With ``ahead`` (the default on CUDA), a thread prepares the next batch while the caller trains
    on this one: on a GPU it decodes, lights and normalises on a stream of its own, so that work
    overlaps the training step instead of preceding it. The batches and their order are the same
    either way.
    """
    if not (device.type == "cuda" if ahead is None else ahead):
        for batch in arrived(start(loader)):
            yield batch, batch.to_device(device, channels_last)
        return
    ready, stop = queue.Queue(maxsize=1), threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    batches = arrived(start(loader))  # here: workers started from the thread would die with it (die_with_parent)

    def prepare():
        try:
            with torch.cuda.stream(stream) if stream else contextlib.nullcontext():
                for batch in batches:
                    images = batch.to_device(device, channels_last)
                    event = stream.record_event() if stream else None
                    if not hand_over(ready, stop, (batch, images, event)):
                        return
            hand_over(ready, stop, None)
        except BaseException as error:  # re-raised in the caller's thread
            hand_over(ready, stop, error)

    thread = threading.Thread(target=prepare, name="on_device", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            batch, images, event = item
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                if images is not None:
                    images.record_stream(current)  # freed only once the training step is done with it
            yield batch, images
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            ready.get_nowait()  # unblocks a hand-over in progress
        # A thread waiting for a batch that never comes (a stuck worker) is left behind: what
        # leaves early is a run that ends.
        thread.join(timeout=JOIN_TIMEOUT)


# How long leaving ``on_device`` early waits for the batch its thread is preparing.
JOIN_TIMEOUT = 10


def hand_over(ready, stop, item):
    """Puts ``item`` in ``ready`` unless ``stop`` is set first; returns whether it did."""
    while not stop.is_set():
        with contextlib.suppress(queue.Full):
            ready.put(item, timeout=0.1)
            return True
    return False


def images_per_second(loader, epoch, device=None):
    """Times one epoch of ``loader``: readable images per second.

    Args:
        device: where to finish each batch (``Batch.to_device``), so that the rate includes the
            device's share of the work; None times the loader's workers alone.
    """
    loader.sampler.set_epoch(epoch)
    started, count = time.perf_counter(), 0
    for batch in start(loader):
        if device is not None:
            batch.to_device(device)
        count += len(batch)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started)
