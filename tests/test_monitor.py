"""The paper's measurements against values computed by hand on small, known weights."""
import json

import pytest
import torch
import torch.nn as nn

from models import reactnet
from models.layers import binary_convs
from utils.monitor import PaperMetrics, MetricsLog, channel_abs_mean


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = reactnet(4, binary_weights=True)
    with torch.no_grad():
        for _, conv in binary_convs(net):
            conv.weight.fill_(0.5)  # every latent weight positive
    return net


def total_binary_weights(net):
    return sum(conv.weight.numel() for _, conv in binary_convs(net))


def test_flip_flop_ratio_counts_sign_changes_of_one_step(model):
    metrics = PaperMetrics(model)
    first, last = binary_convs(model)[0][1], binary_convs(model)[-1][1]
    with torch.no_grad():
        first.weight.view(-1)[:10] = -0.5   # 10 flips from +1 to -1
        last.weight.view(-1)[:4] = -1e-30   # 4 flips by a hair
        last.weight.view(-1)[4:7] = 0.0     # 3 moves to exactly 0: sign bit unchanged, no flip
    metrics.after_step()
    summary = metrics.epoch_summary()
    assert summary["flip_flop"] == pytest.approx((10 + 4) / total_binary_weights(model))
    assert summary["flip_flop_per_layer"][binary_convs(model)[0][0]] == pytest.approx(10 / first.weight.numel())
    assert summary["flip_flop_per_layer"][binary_convs(model)[-1][0]] == pytest.approx(4 / last.weight.numel())


def test_flip_flop_ratio_is_averaged_over_the_epochs_steps(model):
    metrics = PaperMetrics(model)
    conv = binary_convs(model)[0][1]
    for flipped in (-0.5, 0.5, 0.5):  # flips 8, then 8 back, then none
        with torch.no_grad():
            conv.weight.view(-1)[:8] = flipped
        metrics.after_step()
    assert metrics.epoch_summary()["flip_flop"] == pytest.approx(16 / 3 / total_binary_weights(model))
    metrics.start_epoch()
    metrics.after_step()
    assert metrics.epoch_summary()["flip_flop"] == 0


def test_c2i_is_the_sign_correlation_with_the_start_of_the_step(model):
    metrics = PaperMetrics(model)
    assert metrics.epoch_summary()["c2i"] == 1
    name, conv = binary_convs(model)[2]
    with torch.no_grad():
        conv.weight.view(-1)[:100] = -1.0
    summary = metrics.epoch_summary()
    assert summary["c2i"] == pytest.approx(1 - 2 * 100 / total_binary_weights(model))
    assert summary["c2i_per_layer"][name] == pytest.approx(1 - 2 * 100 / conv.weight.numel())


def test_c2i_keeps_its_reference_across_a_resume(model):
    initial = PaperMetrics(model).initial_signs
    with torch.no_grad():
        for _, conv in binary_convs(model):
            conv.weight.neg_()
    assert PaperMetrics(model, initial).epoch_summary()["c2i"] == -1


def test_saturation_is_the_share_beyond_one_on_sampled_batches(model):
    metrics = PaperMetrics(model, saturation_batches=1)
    metrics.activation_inputs = [("probe", nn.Identity())]
    metrics.start_epoch()
    probe = metrics.activation_inputs[0][1]
    with metrics.sample_saturation():
        probe(torch.tensor([0.5, -2.0, 1.0, -1.0, 1.5, 0.0]))  # |x| > 1: two of six
    with metrics.sample_saturation():  # beyond the sampled batches: not counted
        probe(torch.tensor([5.0, 5.0]))
    summary = metrics.epoch_summary()
    assert summary["saturation"] == pytest.approx(2 / 6)
    assert summary["saturation_per_layer"] == {"probe": pytest.approx(2 / 6)}


def test_saturation_covers_every_binary_conv_input(model):
    metrics = PaperMetrics(model)
    with metrics.sample_saturation():
        model(torch.randn(2, 3, 32, 32))
    layers = metrics.epoch_summary()["saturation_per_layer"]
    assert len(layers) == 26 and "feature.1.binary_3x3" in layers and "feature.13.binary_pw" in layers
    assert all(0 <= share <= 1 for share in layers.values())


def test_channel_abs_mean():
    weight = torch.tensor([[[[1.0, -3.0]]], [[[-0.5, 0.5]]]])
    assert torch.equal(channel_abs_mean(weight), torch.tensor([2.0, 0.5]))


def test_training_log_writes_jsonl_and_tensorboard(tmp_path, model):
    log = MetricsLog(tmp_path, enabled=True)
    log.iteration(0, {"loss": 1.5})
    log.epoch(0, {"val_top1": 12.5, "flip_flop_per_layer": {"a": 0.1}, "saturation": None}, model)
    log.close()
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record == {"epoch": 0, "val_top1": 12.5, "flip_flop_per_layer": {"a": 0.1}, "saturation": None}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
