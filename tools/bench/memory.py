"""Memory of one training iteration, read three ways (see NOTES).

On a CPU the peak comes from the allocator events that torch.profiler records with
``profile_memory``; PyTorch has no public per-event API for them, so ``allocated_peak`` reads the
profiler's Kineto results, the one place that ties this file to PyTorch internals.
"""
import contextlib
import ctypes

import torch

MEASURED = "benchmark: measured iteration"

NOTES = {
    "peak": "peak MiB = most tensor memory allocated during one iteration above what was held "
            "before it (CUDA: max_memory_allocated; CPU: the allocator's events recorded by "
            "torch.profiler with profile_memory)",
    "saved": "saved MiB = tensors saved for backward (torch.autograd.graph.saved_tensors_hooks; "
             "distinct storages, parameters and buffers excluded): the activation memory, "
             "deterministic",
    "rss": "RSS MiB = growth of the host's peak resident set during one iteration (Linux VmHWM "
           "reset through /proc/self/clear_refs after malloc_trim); includes allocator slack and "
           "library scratch buffers",
}


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_peak(prepare, run, device):
    """Calls ``prepare()`` then ``run()``; returns the result of ``run()`` and the most tensor bytes
    allocated while it ran, above the amount allocated when it started."""
    if device.type == "cuda":
        prepare()
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = run()
        synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    # The profiler does not see the release of a block allocated before it started, so prepare()
    # runs under it too: every block that run() releases was then allocated under its eyes.
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as profiler:
        prepare()
        with torch.profiler.record_function(MEASURED):
            result = run()
    events = list(profiler.profiler.kineto_results.events())
    window = next(e for e in events if e.name() == MEASURED)
    start, end = window.start_ns(), window.start_ns() + window.duration_ns()
    # Each allocator event carries +bytes (allocation) or -bytes (release): their running sum in
    # time order is the allocated amount, relative to the start of prepare().
    memory = sorted((e for e in events if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU), key=lambda e: e.start_ns())
    live = at_start = peak = 0
    for event in memory:
        if event.start_ns() > end:
            break
        live += event.nbytes()
        if event.start_ns() < start:
            at_start = peak = live
        else:
            peak = max(peak, live)
    return result, peak - at_start


def resident_growth(run):
    """Runs ``run()``; returns its result and how far the peak resident set size rose above the
    size before it (None where the kernel does not let a process reset its peak: not Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        # Hand memory freed earlier back to the system, so the growth starts from what is in use.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        before = _status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident size, to the current size
    except OSError:
        before = None
    result = run()
    return result, None if before is None else (_status_kib("VmHWM") - before) * 1024


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")
