"""Stopping a run cleanly on SIGTERM (preemption) or Ctrl-C, at an iteration boundary."""
import signal


class Stopped(Exception):
    """Training stopped on a signal after writing a resumable checkpoint."""

    def __init__(self, signum, epoch, iteration, path):
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch} iteration "
                         f"{iteration}; saved {path}: run the same command to resume")
        self.signum = signum


class StopSignals:
    """Turns SIGTERM and SIGINT (preemption, Ctrl-C) into a request to stop at the next iteration
    boundary. A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = None
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

    def guard(self, loader):
        """Iterates ``loader`` but ends quietly if it fails after a stop was requested (a worker
        ignores the signal once started, but one signalled while starting may have died of it)."""
        iterator = iter(loader)
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
