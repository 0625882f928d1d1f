"""How every command ends: one line for what a user can fix, a traceback only for a bug, and no
process of ours left behind, whatever ended it."""
import contextlib
import functools
import multiprocessing
import os
import signal
import sys
import traceback

from models import CheckpointError
from models.registry import RegistryError


class UserError(Exception):
    """Bad input or configuration; the message says what is wrong and what to do."""


# What a user can fix; anything else that escapes a command is a bug and keeps its traceback.
USER_ERRORS = (UserError, CheckpointError, RegistryError)


def printable(text):
    """``text`` as any terminal or log can take it: a file name that is not UTF-8 (Python carries
    its bytes as surrogates) is shown with ``\\x`` escapes instead of failing the print."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def end_child_processes():
    """SIGKILLs and reaps every process this one started through multiprocessing (the loader's
    workers). Python's own exit handler would send them SIGTERM, which they ignore (see
    ``utils.data.ignore_stop_signals``), and then wait for them forever."""
    # The DataLoader's SIGCHLD handler would raise in this thread for each worker killed here.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    children = multiprocessing.active_children()
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def report_user_errors(main):
    """Runs a command's ``main`` and ends the process the same way however it ends.

    A UserError, CheckpointError or RegistryError becomes one ``error:`` line and exit status 2; a
    Ctrl-C that reaches this point (a second one during training, any one elsewhere) one line and
    130; any other exception keeps its traceback (a bug) and exits with 1. In every case the
    command's child processes are ended before it exits.

    Under torchrun every rank meets the same error; only rank 0 prints it.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # Started in the background by a non-interactive shell (run.sh), Python would inherit
        # SIGINT ignored and a Ctrl-C forwarded by run.sh would do nothing until training starts.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            return main(*args, **kwargs)
        except SystemExit:
            raise
        except BaseException as e:  # noqa: B036 -- every way out is reported, then ends below
            status, message = 1, None
            if isinstance(e, USER_ERRORS):
                status, message = 2, str(e)
            elif isinstance(e, KeyboardInterrupt):
                status, message = 130, ("interrupted by Ctrl-C at once: the run folder keeps its last "
                                        "checkpoint, if any (a single Ctrl-C during training saves first)")
            else:
                traceback.print_exc()
            if message and os.environ.get("RANK", "0") == "0":
                with contextlib.suppress(OSError):  # a reader that is gone (run.sh's tee, killed) changes no status
                    print(f"error: {printable(message)}", file=sys.stderr, flush=True)
            raise SystemExit(status) from None
        finally:
            end_child_processes()

    return wrapper
