"""Process-group set-up for torchrun (env://), and the few collectives the engine needs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .cli import resolve_device


@dataclass
class Context:
    """Where this process runs: its rank among ``world_size`` and its device."""
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


def init(device=None):
    """Joins the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on GPUs, gloo on CPU).

    Args:
        device: ``cuda`` or ``cpu``; by default CUDA when available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    use_cuda = resolve_device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://")
    return Context(rank, world_size, local_rank, local_world_size, device)


def all_reduce_sum(tensor, ctx):
    """Sums ``tensor`` over all ranks in place (no-op in a single process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flags, ctx):
    """For each flag, True on every rank if it is true on any rank (one collective for all).
    ``ctx`` None means a single process."""
    if ctx is None or not ctx.distributed:
        return [bool(f) for f in flags]
    t = torch.tensor([int(bool(f)) for f in flags], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def broadcast_buffers(module, ctx):
    """Copies rank 0's buffers (BatchNorm statistics) to every rank.

    Each rank updates BatchNorm statistics from its own share of the last batch; rank 0's are the
    ones saved in checkpoints, so every rank validates with them.
    """
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(ctx):
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx):
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
