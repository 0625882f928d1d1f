"""Stopping a run cleanly on a stop signal (preemption, Ctrl-C, a scheduler's warning), at an
iteration boundary or at once while it waits for data; and the bound on that wait."""
import signal
import threading

from .errors import UserError

# How long a run waits for its next batch by default (--data_timeout): far beyond what a healthy
# loader ever takes, even for the first batch of an epoch on a cold network file system.
DATA_TIMEOUT = 600.0
# A stop that arrived while the run was busy lets it train the iteration whose batch comes next, if
# that batch comes within this many seconds.
STOP_GRACE = 5.0


class Stopped(Exception):
    """Training stopped on a signal after writing a resumable checkpoint."""

    def __init__(self, signum, epoch, iteration, path):
        """``path``: the checkpoint written, or None where nothing was trained to write."""
        saved = (f"saved {path}: run the same command to resume" if path else
                 "nothing was trained yet, so nothing was saved: run the same command to start")
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch} iteration "
                         f"{iteration}; {saved}")
        self.signum = signum


class StopWhileWaiting(BaseException):
    """A stop signal arrived while the run waited for a batch. Raised from the signal handler in
    the middle of the loader's code, so it derives from BaseException, as KeyboardInterrupt does:
    the loader's own ``except Exception`` clauses pass it on."""


class DataStopped(UserError):
    """The data stopped coming: ``what`` happened and ``fix``, what to do before running again (a
    training adds what it saved between the two)."""

    def __init__(self, what, fix):
        super().__init__(f"{what}; {fix}, then run the command again")
        self.what, self.fix = what, fix


class DataStalled(DataStopped):
    """No batch came from the loader within the bound."""

    def __init__(self, seconds):
        super().__init__(f"no batch came from the data loader in {seconds:g} s (--data_timeout): a "
                         f"loader worker is stuck, most likely reading from a file system that stopped "
                         f"answering (a hung network mount), or the storage is that slow",
                         "check the storage (a larger --data_timeout waits longer)")


class StopSignals:
    """Turns SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 (preemption, Ctrl-C, a scheduler's warning such as
    ``#SBATCH --signal=B:USR1@300``) into a request to stop at the next iteration boundary. A second
    Ctrl-C interrupts at once.

    A stop that arrives while the run waits for its next batch (``guard``) does not wait for that
    batch: a loader worker stuck in a read (a hung network file system) would hold the run forever.
    Nothing of the iteration to come has run then, so the run is at a boundary already.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self, interrupt_waits=True):
        """``interrupt_waits`` False keeps a stop from cutting a wait short: the processes of a
        distributed run must agree on the iteration they stop at, which they do after a backward
        pass (utils/training_step.py)."""
        self.requested = None
        self.interrupt_waits = interrupt_waits
        self.waiting = False
        self.previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.requested == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signum
        if self.waiting and self.interrupt_waits:
            raise StopWhileWaiting

    def guard(self, batches, timeout=DATA_TIMEOUT):
        """Iterates ``batches`` (a loader's) with each wait bounded by ``timeout`` seconds
        (``bounded_waits``); a stop that arrives during a wait raises StopWhileWaiting at once, and
        one that arrived before it does if the batch takes more than STOP_GRACE seconds. Once a
        stop was requested, a loader that fails ends the iteration quietly instead (a worker
        ignores the signal once started, but one signalled while starting may have died of it)."""
        iterator = iter(bounded_waits(batches, timeout, self))
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception:
                if self.requested:
                    return
                raise
            yield batch


def bounded_waits(batches, timeout=DATA_TIMEOUT, stop=None):
    """Yields the items of ``batches``, raising DataStalled when one takes more than ``timeout``
    seconds to come (0: no bound).

    The bound is a SIGALRM, so it holds in the main thread only (elsewhere the waits are not
    bounded): it interrupts the wait wherever it is, in the loader's queue, in the thread of
    ``utils.data.on_device`` or in a read of the main process itself (``--workers 0``). With
    ``stop`` (a StopSignals) a stop signal also ends the wait, as ``StopSignals.guard`` says.
    """
    iterator = iter(batches)
    if threading.current_thread() is not threading.main_thread():
        yield from iterator
        return

    def expired(signum, frame):
        if stop is not None and stop.requested and stop.interrupt_waits:
            raise StopWhileWaiting
        raise DataStalled(timeout)

    previous = signal.signal(signal.SIGALRM, expired)
    try:
        while True:
            bound = timeout
            if stop is not None and stop.requested and stop.interrupt_waits:
                bound = min(bound, STOP_GRACE) if bound else STOP_GRACE
            if stop is not None:
                stop.waiting = True
            signal.setitimer(signal.ITIMER_REAL, bound)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if stop is not None:
                    stop.waiting = False
            yield batch
    finally:
        signal.signal(signal.SIGALRM, previous)
