"""Latency of one call, shared by both sides of tools/export_lce.py (no torch, no TensorFlow here)."""
import statistics
import time


def latency_ms(run, runs, warmup=3):
    """Times ``runs`` calls of ``run`` after ``warmup`` untimed ones.

    Returns:
        ``{"median", "min", "max"}`` of the wall-clock time and ``"cpu_median"`` of this process's
        CPU time, in milliseconds, and ``"runs"``. On a machine shared with other work the wall
        clock grows with the load; the CPU time of a single-threaded call much less.
    """
    for _ in range(warmup):
        run()
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(1000 * (time.perf_counter() - start))
        cpu.append(1000 * (time.process_time() - start_cpu))
    return {"median": statistics.median(wall), "min": min(wall), "max": max(wall),
            "cpu_median": statistics.median(cpu), "runs": runs}
