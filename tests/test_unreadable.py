"""The unreadable-image limit: a share of the images read so far in the epoch, past a small floor,
the same for every batch size, in training and evaluation, and over processes."""
import datetime
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import run_script, single_error_line, write_image_folder
from models import RunSpec, reactnet
from utils import distributed
from utils.cli import UNREADABLE_FLOOR
from utils.data import SeededSampler, make_loader, open_split
from utils.errors import UserError
from utils.evaluation import UnreadableLimit, evaluate
from utils.pipeline import UnreadableImage


def bad(k):
    return UnreadableImage(f"bad_{k}.png", "OSError: broken")


def read_in_batches(unreadable_positions, total, batch_size, max_share=0.5):
    """Feeds ``total`` images, those at ``unreadable_positions`` unreadable, to an UnreadableLimit
    in batches; returns the number of images read when it stopped, or None."""
    limit = UnreadableLimit(max_share, log=lambda line: None)
    for start in range(0, total, batch_size):
        positions = range(start, min(start + batch_size, total))
        unreadable = [bad(k) for k in positions if k in unreadable_positions]
        try:
            limit.update(unreadable, len(positions) - len(unreadable))
        except UserError:
            return limit.read
    return None


@pytest.mark.parametrize("position", [0, 15, 16, 32])
def test_one_bad_image_stops_no_batch_size(position):
    # Before, a bad image alone in the last batch (33 = 16 + 16 + 1) stopped the pass.
    for batch_size in (1, 11, 16, 33):
        assert read_in_batches({position}, 33, batch_size) is None


def test_the_floor_and_the_share_of_everything_read():
    # The first 10 unreadable images never stop; the 11th does when they are over half of those read.
    broken_start = set(range(UNREADABLE_FLOOR + 1))
    assert all(read_in_batches(broken_start, 100, b) is not None for b in (1, 4, 11))
    assert read_in_batches(broken_start, 100, 1) == UNREADABLE_FLOOR + 1
    # 11 unreadable spread over 100 images stay under half of what was read at every point.
    spread = set(range(0, 100, 9))
    assert len(spread) > UNREADABLE_FLOOR
    assert all(read_in_batches(spread, 100, b) is None for b in (1, 7, 16, 100))
    # A mostly broken set stops whatever the batch size.
    mostly_broken = {k for k in range(100) if k % 4}
    assert all(read_in_batches(mostly_broken, 100, b) is not None for b in (1, 7, 16, 100))


def test_share_zero_stops_at_the_first():
    assert read_in_batches({20}, 33, 16, max_share=0) == 32


@pytest.fixture(scope="module")
def val_33(tmp_path_factory):
    """33 validation images, the last in order (class_2/9.png) a text file; a checkpoint to evaluate."""
    root = tmp_path_factory.mktemp("val_33")
    data = write_image_folder(root / "data", {"val": 11})
    (root / "data" / "val" / "class_2" / "9.png").write_text("plain text")
    torch.manual_seed(0)
    checkpoint = root / "bare.pth"
    torch.save(reactnet(3, binary_weights=True).state_dict(), checkpoint)
    return data, checkpoint


def evaluate_val(val, batch_size, *flags):
    data, checkpoint = val
    return run_script("evaluate.py", "--data", data, "--checkpoint", checkpoint, "--image_size", 32,
                      "--batch_size", batch_size, "-j", 0, "--device", "cpu", *flags)


@pytest.mark.slow
def test_evaluate_gives_the_same_outcome_at_every_batch_size(val_33):
    outcomes = []
    for batch_size in (16, 11):
        result = evaluate_val(val_33, batch_size)
        assert result.returncode == 0, result.stderr[-2000:]
        outcomes.append([line for line in result.stdout.splitlines() if line.startswith(" * ")])
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][1] == " * 1 unreadable of 33 validation images excluded from these accuracies"


def test_too_many_unreadable_images_stop_with_one_line(val_33, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(val_33[0], data)
    for k in range(UNREADABLE_FLOOR + 1):  # class_0 is read first: 11 of its 11 images
        (data / "val" / "class_0" / f"{k}.png").write_text("plain text")
    line = single_error_line(evaluate_val((data, val_33[1]), 16))
    assert line == (f"error: 11 of the 16 validation images read so far were unreadable (e.g. "
                    f"{data / 'val' / 'class_0' / '9.png'}), more than --max_unreadable_share 0.5 "
                    f"of them and more than {UNREADABLE_FLOOR}: check the dataset")


# --- Over processes: two gloo ranks in spawned processes ---

def two_ranks(rank, port, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    ctx = distributed.Context(rank, 2, rank, 2, torch.device("cpu"))
    try:
        # Per rank and batch: unreadable of 16. Rank 0's first batch alone would stop it (12 of 16);
        # with rank 1's, 12 of 32 do not; the third batch brings 60 of 96.
        limit = UnreadableLimit(0.5, log=lambda line: None, ctx=ctx)
        stopped = None
        for step, unreadable in enumerate([(12, 0), (0, 16), (16, 16)]):
            try:
                limit.update([bad(k) for k in range(unreadable[rank])], 16 - unreadable[rank])
            except UserError:
                stopped = (step, limit.unreadable, limit.read)
                break
        # 9 images over 2 ranks at 4 a batch: rank 0 has 2 batches, rank 1 one.
        dataset = open_split(data, "val", RunSpec(image_size=32))
        loader = make_loader(dataset, SeededSampler(len(dataset), shuffle=False, rank=rank, world_size=2),
                             4, 0, False)
        torch.manual_seed(0)
        val = evaluate(reactnet(3), loader, ctx.device, log=lambda line: None, ctx=ctx)
        results.put((rank, stopped, len(loader), val["top1"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_judge_the_summed_counts_and_evaluate_uneven_shares(tmp_path):
    data = write_image_folder(tmp_path / "data", {"val": 3})
    results = mp.get_context("spawn").SimpleQueue()
    port = 29400 + os.getpid() % 1000
    mp.spawn(two_ranks, args=(port, data, results), nprocs=2, join=True)
    by_rank = sorted(results.get() for _ in range(2))
    assert [r[1] for r in by_rank] == [(2, 60, 96)] * 2
    assert [r[2] for r in by_rank] == [2, 1]
    assert by_rank[0][3] == by_rank[1][3]
