"""Errors that a user can fix, reported as one line instead of a traceback."""
import functools
import os
import sys

from models import CheckpointError
from models.registry import RegistryError


class UserError(Exception):
    """Bad input or configuration; the message says what is wrong and what to do."""


def report_user_errors(main):
    """Runs ``main``; a UserError, CheckpointError or RegistryError becomes one line on stderr and
    exit status 2.

    Under torchrun every rank meets the same error; only rank 0 prints it.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (UserError, CheckpointError, RegistryError) as e:
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
