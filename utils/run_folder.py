"""The run folder: checkpoints written so that a crash at any moment leaves a loadable one
behind, the RNG states they carry, and the text log."""
import errno
import fcntl
import os
import random
import re
import contextlib
import shutil
import socket
import sys

import numpy as np
import torch

from . import distributed
from .errors import UserError, printable

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


class RunFolderLock:
    """The run folder's lock, held by this process for its life; a UserError if another run holds it.

    Two locks, since either alone can be walked around:

    - a POSIX record lock (``lockf``) on ``run.lock``, which names its holder. The kernel releases
      it whenever the process ends, even by SIGKILL, so a crashed run never blocks its own resume,
      and it works across the nodes of a shared NFS folder. But a run.lock deleted by hand takes
      the lock with it;
    - a ``flock`` on the folder itself, which no file operation inside it removes. Filesystems
      that refuse flock on a folder (NFS) keep the first only; there ``verify`` notices a removed
      run.lock before each checkpoint and takes it again, or stops if another run took it.

    A forked child (a loader worker) closes its copy of the folder's descriptor at once, so the
    flock, shared with such copies, ends with this process too.
    """

    # The locks this process holds, by folder: like the POSIX lock, the folder's lock belongs to the
    # process, so a second run built in the same process (a test, a notebook) shares it.
    held = {}

    @classmethod
    def take(cls, folder):
        return cls.held.get(folder) or cls(folder)

    def __init__(self, folder):
        self.folder, self.path, self.fd = folder, os.path.join(folder, LOCK), None
        self.folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.register_at_fork(after_in_child=self.close_folder_fd)
        try:
            fcntl.flock(self.folder_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.in_use()
        except OSError:  # no flock on folders here: run.lock alone
            self.close_folder_fd()
        self.fd = self.lock_file()
        if self.fd is None:
            self.in_use()
        RunFolderLock.held[folder] = self

    def lock_file(self):
        """Locks run.lock (created if absent) and writes this process in it; None if another holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        return fd

    def in_use(self):
        try:
            with open(self.path) as f:
                holder = f.read().strip() or "unknown"
        except OSError:
            holder = f"{LOCK} removed"
        self.close()
        raise UserError(f"the run folder {self.folder} is in use by another run ({holder}): wait for "
                        f"it to end or stop it, or pass another --save")

    def verify(self):
        """Takes run.lock again if it was removed or replaced since; a UserError if another run has
        taken the folder meanwhile, so that this one writes nothing more there."""
        if not os.path.isdir(self.folder):
            raise folder_removed(self.folder)
        try:
            same = os.path.samestat(os.stat(self.path), os.fstat(self.fd))
        except FileNotFoundError:
            same = False
        if same:
            return
        fd = self.lock_file()
        if fd is None:
            raise UserError(f"{self.path} was removed while this run held it, and another run has taken "
                            f"the folder {self.folder}: this run stops without writing there")
        os.close(self.fd)
        self.fd = fd

    def close_folder_fd(self):
        if self.folder_fd is not None:
            os.close(self.folder_fd)
            self.folder_fd = None

    def close(self):
        if RunFolderLock.held.get(self.folder) is self:
            del RunFolderLock.held[self.folder]
        self.close_folder_fd()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def write_atomically(path, write):
    """Calls ``write(tmp)`` on a temporary file beside ``path`` and renames it over ``path`` once
    whole and on disk: ``path`` is never seen half written, and a failure leaves it as it was and
    no temporary file behind. Raises what the write raised (OSError, or torch.save's RuntimeError)."""
    tmp = f"{path}{PARTIAL}{os.getpid()}"
    try:
        write(tmp)
        _replace_atomically(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


# The fix for a failed write, by its errno; anything else (torch.save's RuntimeError names none) is
# taken for a full disk.
WRITE_FIXES = {
    errno.EDQUOT: "free space within your disk quota or pass another --save",
    errno.EFBIG: "raise the file size limit (ulimit -f) or pass another --save",
    errno.EACCES: "make it writable or pass another --save",
    errno.EPERM: "make it writable or pass another --save",
    errno.EROFS: "pass a --save on a writable file system",
    errno.ENOTDIR: "a file stands where a folder is needed: move it away or pass another --save",
    errno.EEXIST: "a file stands where a folder is needed: move it away or pass another --save",
    errno.EISDIR: "a folder stands where a file is needed: move it away or pass another --save",
}


def write_failed(what, folder, error, kept):
    """The UserError for a failed write in the run folder ``folder``: ``what`` failed (e.g. "could
    not write PATH"), ``error`` says why, ``kept`` what is still intact (None: nothing is), and the
    fix is the one that applies to the error; a folder removed meanwhile says so."""
    if not os.path.isdir(folder):
        return folder_removed(folder)
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
    filename = getattr(error, "filename", None)
    if filename and str(filename) not in what:
        reason = f"{reason}: {filename}"
    fix = WRITE_FIXES.get(getattr(error, "errno", None), "free disk space or pass another --save")
    kept = f"{kept} is intact" if kept else "no checkpoint of this run was written there yet"
    return UserError(f"{what} ({reason}); {kept}: {fix}, then run the same command")


def folder_removed(folder):
    """The UserError for a run folder that was removed while the run used it."""
    return UserError(f"the run folder {folder} was removed while this run used it, and its checkpoints "
                     f"with it: this run stops without writing more; restore the folder to resume, or "
                     f"run the same command to train from the start")


def last_checkpoint(folder):
    """What a failed write leaves intact in ``folder``: its checkpoint, if it has one."""
    return "the last checkpoint there" if os.path.exists(os.path.join(folder, LAST)) else None


def _write(path, write):
    try:
        write_atomically(path, write)
    except (OSError, RuntimeError) as e:
        kept = "the previous file there" if os.path.exists(path) else None
        raise write_failed(f"could not write {path}", os.path.dirname(path), e, kept) from None


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
    job on other nodes may share the folder) and checks that it is writable.

    Returns:
        the folder's absolute path, and its RunFolderLock (None on the other processes), held
        until this process ends.
    """
    folder = os.path.abspath(folder)
    lock = None
    if ctx.is_main:
        try:
            os.makedirs(folder, exist_ok=True)
            lock = RunFolderLock.take(folder)
            remove_partial_files(folder)
            probe = os.path.join(folder, f"{WRITE_TEST}{os.getpid()}")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {folder} ({e.strerror}): pass a "
                            f"writable --save") from None
    distributed.barrier(ctx)
    return folder, lock


def print_while_read(line):
    """Prints ``line``; if what read the output is gone (a `| tee` ended by the job's SIGTERM, or
    killed with run.sh), the output goes nowhere from then on instead of failing the run."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class ConsoleLog:
    """Prints on the main process and appends the same lines to ``SAVE/log.txt``."""

    def __init__(self, path=None, enabled=True):
        self.path, self.enabled = path, enabled

    def __call__(self, message):
        if not self.enabled:
            return
        message = printable(message)
        print_while_read(message)  # the run goes on to its checkpoint; log.txt keeps every line
        if self.path:
            try:
                with open(self.path, "a") as f:
                    f.write(message + "\n")
            except OSError as e:
                folder = os.path.dirname(self.path)
                raise write_failed(f"could not append to {self.path}", folder, e,
                                   last_checkpoint(folder)) from None
