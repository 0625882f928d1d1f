"""Runs a training script and interrupts it from inside, at a chosen optimizer step.

    python tests/interrupted_run.py SCRIPT [FLAGS...]

SCRIPT (e.g. step1/train.py) runs as ``__main__`` in this process, with FLAGS as its arguments;
with INTERRUPTED_SCRIPT=SCRIPT set, all the arguments are FLAGS (so that a launcher can start this
file in place of the script). Right after the optimizer step number INTERRUPT_AFTER_STEP (1-based,
counted in this process), a PyTorch optimizer post-hook sends the signal INTERRUPT_SIGNAL (a name
such as SIGKILL or SIGTERM) to this process, or with INTERRUPT_TARGET=parent to the parent process
(torchrun's agent, as a cluster scheduler would), and for a signal the script handles it then waits
until that signal has reached this process. With INTERRUPT_TARGET=outside it sends nothing: it
prints a line starting with ``interrupted_run: waiting`` and waits for the signal from another
process (a test sending it to the whole process group, as a scheduler does). Under torchrun only
the rank INTERRUPT_RANK (default 0) sends it or waits for it.

The moment is a fixed point of the run (an update applied in memory, nothing after it saved), so
what a test checks does not depend on timing. With INTERRUPT_DURING=forward the moment is instead
the start of the student's forward pass of that step (its classifier's forward in training mode):
the step is under way, its update not yet applied; with INTERRUPT_DURING=evaluation, the start of
the classifier's forward pass in evaluation mode (evaluate.py). With INTERRUPT_COUNT=N (default 1)
it waits for N signals, printing ``interrupted_run: received K`` as the K-th arrives.
"""
import os
import runpy
import signal
import sys
import time

import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

after_step = int(os.environ["INTERRUPT_AFTER_STEP"])
signum = getattr(signal, os.environ["INTERRUPT_SIGNAL"])
target = {"parent": os.getppid(), "outside": None}.get(os.environ.get("INTERRUPT_TARGET"), os.getpid())
sends = os.environ.get("RANK", "0") == os.environ.get("INTERRUPT_RANK", "0")

received = []
_install = signal.signal


def recording_install(number, handler):
    """Installs ``handler`` wrapped so that this file sees when the signal arrives."""
    if number == signum and callable(handler):
        inner = handler

        def handler(number, frame):
            received.append(number)
            return inner(number, frame)
    return _install(number, handler)


signal.signal = recording_install
steps = 0
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))  # the repository
from utils.run_folder import print_while_read as say  # noqa: E402  (run.sh's tee may be gone)


def at_step(*_):
    global steps
    steps += 1
    if steps != after_step or not sends:
        return
    name = signal.Signals(signum).name
    moment = f"during step {steps}" if during else f"after optimizer step {steps}"
    if target is None:
        say(f"interrupted_run: waiting for {name} {moment}")
    else:
        say(f"interrupted_run: sending {name} {moment}")
        os.kill(target, signum)
    deadline, seen = time.time() + 60, 0
    while seen < count:  # a SIGKILL of this process never returns here
        assert time.time() < deadline, "the signal never arrived"
        time.sleep(0.01)
        if len(received) > seen:
            seen = len(received)
            say(f"interrupted_run: received {seen}")


during = os.environ.get("INTERRUPT_DURING")
count = int(os.environ.get("INTERRUPT_COUNT", "1"))


def before_classifier(module, args):
    if isinstance(module, torch.nn.Linear) and module.training == (during == "forward"):
        at_step()


if during:
    register_module_forward_pre_hook(before_classifier)
else:
    register_optimizer_step_post_hook(at_step)
if "INTERRUPTED_SCRIPT" in os.environ:
    script = os.path.abspath(os.environ["INTERRUPTED_SCRIPT"])
    sys.argv = [script, *sys.argv[1:]]
else:
    script = os.path.abspath(sys.argv[1])
    sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
