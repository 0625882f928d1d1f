"""What every command does first, before it imports torch: a Ctrl-C during its imports ends it in
one line, and a training that run.sh started ends with run.sh, however run.sh ends.

Only the standard library is imported here, so that an entry script can call ``begin`` before
anything slow loads.
"""
import ctypes
import os
import signal
import sys

# run.sh exports its PID under this name (utils/launch.sh); the command it starts, or torchrun's
# processes, end with the process it names.
LAUNCHER_PID = "BNN_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def begin(name):
    """Prepares a command whose module is named ``name``; does nothing unless it runs as the
    program (``__main__``), so that importing an entry script (a test, flag_docs) changes nothing.

    A Ctrl-C from here until the command's ``main`` starts (``utils.errors.report_user_errors``
    then takes over) prints one line and exits with 130 instead of a KeyboardInterrupt traceback
    from inside an import. It also undoes the SIGINT that a non-interactive shell running the
    command in the background (run.sh) leaves ignored, so that a Ctrl-C passed on by run.sh is
    heard during the imports too.
    """
    if name != "__main__":
        return
    signal.signal(signal.SIGINT, interrupted_while_starting)
    end_with_launcher()


def interrupted_while_starting(signum, frame):
    if os.environ.get("RANK", "0") == "0":
        print("error: interrupted by Ctrl-C while starting, before anything was read or written",
              file=sys.stderr, flush=True)
    os._exit(128 + signum)


def end_with_launcher():
    """If run.sh started this process, has the kernel send it SIGTERM when run.sh ends, however it
    ends (``kill -9`` of run.sh or of its process group included): a training then stops as on a
    preemption, saving a checkpoint of the iteration in progress, and its loader workers end with
    it. Without this a training, which run.sh starts in a process group of its own, would run on
    alone.

    run.sh names itself in BNN_LAUNCHER_PID, which this process removes from its environment so
    that nothing it starts inherits it. If the parent is no longer run.sh once the signal is armed,
    run.sh ended first, and this process ends at once; if run.sh still runs, this process was
    started by another (the name was inherited), and nothing is armed.
    """
    launcher = os.environ.pop(LAUNCHER_PID, "")
    if not launcher.isdigit() or not parent_death_signal(signal.SIGTERM):
        return
    if os.getppid() == int(launcher):
        return
    try:
        os.kill(int(launcher), 0)
    except (ProcessLookupError, PermissionError):  # gone (its number may be another user's by now)
        print(f"error: the launcher of this process (process {launcher}) ended before it started: "
              f"nothing was done", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)
    parent_death_signal(0)


def parent_death_signal(signum):
    """Asks the kernel to send ``signum`` (0: nothing) to this process when the thread that started
    it ends (Linux); returns whether it took."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def run_torchrun():
    """torchrun, ending with run.sh: run.sh starts it through here (utils/launch.sh), so that a
    SIGKILL of run.sh reaches it as SIGTERM, which it passes on to its processes; they, in turn,
    end with it (each one's ``begin``)."""
    end_with_launcher()
    os.environ[LAUNCHER_PID] = str(os.getpid())
    from torch.distributed.run import main
    main()
