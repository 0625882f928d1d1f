"""utils.meters.topk_correct against a brute-force count written here.

A sample is top-k correct when its target is among the k largest logits. Without ties that is
"fewer than k classes have a larger logit". With ties at the k-th place any consistent choice
among the tied classes is acceptable, but exactly min(k, classes) classes of a row are counted:
never more (an optimistic "fewer than k strictly larger" rule) and never fewer.
"""
import pytest
import torch

from utils.meters import topk_correct


def brute_force_bounds(logits, target, k):
    """(surely correct, possibly correct) counts over the batch, from the definition.

    surely: fewer than k classes beat the target even when every tie is lost;
    possibly: fewer than k classes are strictly larger than the target's logit.
    """
    surely = possibly = 0
    for row, t in zip(logits.tolist(), target.tolist()):
        larger = sum(1 for c, v in enumerate(row) if v > row[t])
        tied = sum(1 for c, v in enumerate(row) if v == row[t] and c != t)
        surely += larger + tied < k
        possibly += larger < k
    return surely, possibly


def as_ints(counts):
    return [int(c) for c in counts]


def distinct_logits(batch, classes, seed):
    g = torch.Generator().manual_seed(seed)
    # A random permutation per row: every logit of a row is different.
    return torch.stack([torch.randperm(classes, generator=g) for _ in range(batch)]).float() * 0.37 - 2


def test_without_ties_equals_the_brute_force_count():
    classes = 10
    logits = distinct_logits(200, classes, seed=0)
    target = torch.randint(0, classes, (200,), generator=torch.Generator().manual_seed(1))
    ks = (1, 2, 5, 10)
    counts = as_ints(topk_correct(logits, target, ks))
    expected = [brute_force_bounds(logits, target, k)[0] for k in ks]
    assert counts == expected
    assert counts[-1] == 200
    assert 0 < counts[0] < counts[1] < counts[2] < 200  # the draw exercises every k


def test_hand_made_batch():
    logits = torch.tensor([[0.1, 0.9, 0.3, 0.2, 0.0, -1.0],    # target 1 ranks first
                           [0.1, 0.9, 0.3, 0.2, 0.0, -1.0],    # target 2 ranks second
                           [0.1, 0.9, 0.3, 0.2, 0.0, -1.0],    # target 0 ranks fourth
                           [0.1, 0.9, 0.3, 0.2, 0.0, -1.0]])   # target 5 ranks last
    target = torch.tensor([1, 2, 0, 5])
    assert as_ints(topk_correct(logits, target, ks=(1, 2, 3, 4, 5, 6))) == [1, 2, 2, 3, 3, 4]


def test_default_ks_are_top1_and_top5():
    logits = distinct_logits(50, 8, seed=2)
    target = torch.randint(0, 8, (50,), generator=torch.Generator().manual_seed(3))
    assert as_ints(topk_correct(logits, target)) == [brute_force_bounds(logits, target, k)[0]
                                                     for k in (1, 5)]


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_k_is_capped_at_the_number_of_classes(classes):
    logits = distinct_logits(7, classes, seed=4)
    target = torch.randint(0, classes, (7,), generator=torch.Generator().manual_seed(5))
    top1, top5, top10 = as_ints(topk_correct(logits, target, ks=(1, 5, 10)))
    assert top5 == top10 == 7  # every target is among all the classes
    assert top1 == brute_force_bounds(logits, target, 1)[0]


def test_ks_are_answered_in_the_order_asked():
    logits = distinct_logits(40, 6, seed=6)
    target = torch.randint(0, 6, (40,), generator=torch.Generator().manual_seed(7))
    forward = as_ints(topk_correct(logits, target, ks=(1, 3)))
    assert as_ints(topk_correct(logits, target, ks=(3, 1))) == forward[::-1]


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ties_count_exactly_k_classes_per_row(k):
    # Logits from {0, 1, 2}: most rows tie at the k-th place. Each row is asked once per possible
    # target, so the hits of a row add up to the number of classes that top-k counted for it.
    classes, rows = 6, 30
    g = torch.Generator().manual_seed(8)
    row_logits = torch.randint(0, 3, (rows, classes), generator=g).float()
    logits = row_logits.repeat_interleave(classes, dim=0)
    target = torch.arange(classes).repeat(rows)
    (count,) = as_ints(topk_correct(logits, target, ks=(k,)))
    assert count == rows * min(k, classes)
    surely, possibly = brute_force_bounds(logits, target, k)
    assert surely < count < possibly  # the ties matter in this draw
    # Row by row, within the bounds the definition allows.
    for r in range(rows):
        block = slice(r * classes, (r + 1) * classes)
        (hits,) = as_ints(topk_correct(logits[block], target[block], ks=(k,)))
        low, high = brute_force_bounds(logits[block], target[block], k)
        assert low <= hits <= high and hits == min(k, classes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(dtype):
    # Under --amp the logits arrive in half precision; values distinct in float32 may tie there.
    logits = torch.randn(64, 10, generator=torch.Generator().manual_seed(9)).to(dtype)
    target = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(10))
    for k, count in zip((1, 5), as_ints(topk_correct(logits, target))):
        low, high = brute_force_bounds(logits.float(), target, k)
        assert low <= count <= high


def test_named_meters_print_in_order_and_average_by_name():
    from utils.meters import Meters
    meters = Meters(loss=("Loss", ":.2f"), top1=("Acc@1", ":.1f"))
    meters["loss"].update(2.0, 1)
    meters["loss"].update(1.0, 3)
    meters["top1"].update(50.0, 4)
    assert [str(m) for m in meters] == ["Loss 1.00 (1.25)", "Acc@1 50.0 (50.0)"]
    assert meters.averages("top1", "loss") == {"top1": 50.0, "loss": 1.25}


def test_totals_add_by_name_in_one_tensor():
    from utils.meters import Totals
    totals = Totals(("loss", "correct", "seen", "skipped"), torch.device("cpu"))
    totals.add("skipped", 2)
    batch = totals.add_batch(loss=torch.tensor(3.5), correct=torch.tensor(4), seen=8)
    assert batch == {"loss": 3.5, "correct": 4.0, "seen": 8.0}
    totals.add_batch(loss=torch.tensor(0.25), seen=2)
    assert totals.tensor.dtype == torch.float64 and totals.tensor.shape == (4,)
    assert totals.as_dict() == {"loss": 3.75, "correct": 4.0, "seen": 10.0, "skipped": 2.0}
