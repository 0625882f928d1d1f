"""The run folder: checkpoints written so that a crash at any moment leaves a loadable one
behind, the RNG states they carry, and the text log."""
import fcntl
import os
import random
import re
import shutil
import socket
import sys

import numpy as np
import torch

from . import distributed
from .errors import UserError

LAST = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"


def _replace_atomically(tmp, path):
    """fsyncs ``tmp``, renames it over ``path`` and fsyncs the folder, so ``path`` is always whole."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


PARTIAL = ".partial."
WRITE_TEST = ".write_test."
LOCK = "run.lock"


# The only files that this code writes and a crash may leave behind: a checkpoint being written,
# the writability probe. Any other name in the folder, ".partial" or not, is the user's.
TEMPORARY = re.compile(rf"(({re.escape(LAST)}|{re.escape(BEST)}){re.escape(PARTIAL)}"
                       rf"|{re.escape(WRITE_TEST)})\d+")


def remove_partial_files(folder):
    """Deletes what a crash mid-write left behind; such files are never read."""
    for name in os.listdir(folder):
        if TEMPORARY.fullmatch(name):
            os.remove(os.path.join(folder, name))


def lock_run_folder(folder):
    """Takes the run folder's lock for the life of this process; a UserError if another run holds it.

    A POSIX record lock (``lockf``) belongs to this process alone: the kernel releases it whenever
    the process ends, even by SIGKILL, so a crashed run never blocks its own resume, and the
    loader's forked workers do not hold it after their parent is gone. It also works across the
    nodes of a shared NFS folder. The file names its holder.
    """
    path = os.path.join(folder, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        with open(path) as f:
            holder = f.read().strip() or "unknown"
        os.close(fd)
        raise UserError(f"the run folder {folder} is in use by another run ({holder}): wait for it "
                        f"to end or stop it, or pass another --save") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def _write(path, write):
    tmp = f"{path}{PARTIAL}{os.getpid()}"
    try:
        write(tmp)
        _replace_atomically(tmp, path)
    except (OSError, RuntimeError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"could not write {path} ({reason}); the previous file there is intact: "
                        f"free disk space or pass another --save, then run the same command") from None


def save(state, folder, is_best=False):
    """Writes ``folder/checkpoint.pth.tar`` atomically; copies it to ``model_best.pth.tar`` if best."""
    last = os.path.join(folder, LAST)
    _write(last, lambda tmp: torch.save(state, tmp))
    if is_best:
        _write(os.path.join(folder, BEST), lambda tmp: _link_or_copy(last, tmp))
    return last


def _link_or_copy(source, target):
    # A hard link costs no space or time; the next save replaces checkpoint.pth.tar by a new file,
    # so the link keeps the old contents.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def rng_state():
    """The process's torch, CUDA, numpy and Python RNG states, in types weights_only can load."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached_gaussian": cached},
        "python": random.getstate(),
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def prepare_run_folder(folder, ctx):
    """Creates the run folder on the main process, takes its lock (only there: the processes of a
    job on other nodes may share the folder) and checks that it is writable."""
    folder = os.path.abspath(folder)
    if ctx.is_main:
        try:
            os.makedirs(folder, exist_ok=True)
            lock_run_folder(folder)  # its descriptor stays open until this process ends
            remove_partial_files(folder)
            probe = os.path.join(folder, f"{WRITE_TEST}{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {folder} ({e.strerror}): pass a "
                            f"writable --save") from None
    distributed.barrier(ctx)
    return folder


class ConsoleLog:
    """Prints on the main process and appends the same lines to ``SAVE/log.txt``."""

    def __init__(self, path=None, enabled=True):
        self.path, self.enabled = path, enabled

    def __call__(self, message):
        if not self.enabled:
            return
        try:
            print(message, flush=True)
        except BrokenPipeError:
            # What read the output (a `| tee`) was ended, as the job's SIGTERM ends it: the run goes
            # on to its checkpoint, log.txt keeps every line, the console gets no more.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        if self.path:
            with open(self.path, "a") as f:
                f.write(message + "\n")
