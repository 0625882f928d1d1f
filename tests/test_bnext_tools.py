"""BNext through the repository's tools: released files in evaluate.py with BNext's evaluation
transform, the cost count of tools.summary, the paper's measurements and the LCE export's refusal."""
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (NUM_CLASSES, evaluate_args, main_error_line, run_script, run_tool, succeeded,
                      write_image_folder)
from test_bnext import PARAMETERS, WIDTHS, bnext_spec, randomise
from torchvision import transforms

from models import RunSpec, build_model
from models.checkpoint import CheckpointError, model_from_checkpoint
from models.layers import binary_convs
from models.ops import count_ops
from tools import export_lce
from utils.augment import normalise
from utils.data import SeededSampler, make_loader, open_split
from utils.monitor import PaperMetrics

# BNext's released files: the DDP model's state_dict, the temperatures of every epoch, the optimizer.
RELEASED_EPOCHS = 512


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A BNext-T file in the released layout, for NUM_CLASSES classes, with its model."""
    torch.manual_seed(0)
    model = randomise(build_model(bnext_spec("bnext_tiny", NUM_CLASSES, True)), 1.0)
    temperatures = [0.9 ** e for e in range(RELEASED_EPOCHS)]
    for t in model.temperatures():
        t.fill_(temperatures[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("released") / "BNext-T.pth.tar"
    torch.save({"epoch": RELEASED_EPOCHS - 1, "best_top1_acc": 72.4, "temp": temperatures,
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "alpha": torch.zeros(1),
                "train_loss": [1.0, 0.9], "test_top1": [60.0, 72.4]}, path)
    return str(path), model


def test_released_file_loads_with_arch(released):
    path, model = released
    loaded, _ = model_from_checkpoint(path, {"arch": "bnext_tiny"})
    assert loaded.spec == bnext_spec("bnext_tiny", NUM_CLASSES, True)
    for (name, want), got in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(got, want), name
    assert loaded.epoch_record()["temperature"] == pytest.approx(0.9 ** (RELEASED_EPOCHS - 1))


def test_released_file_without_arch_says_to_name_it(released):
    with pytest.raises(CheckpointError, match="does not fit this ReActNet-A.*needs --arch"):
        model_from_checkpoint(released[0])


def test_a_file_naming_its_arch_rebuilds_it_and_another_arch_does_not_fit(tmp_path):
    path = tmp_path / "ours.pth"
    model = build_model(bnext_spec("bnext_tiny", NUM_CLASSES, True))
    torch.save({"state_dict": model.state_dict(), "step": 2, **model.spec.as_dict()}, path)
    assert model_from_checkpoint(str(path))[0].spec.arch == "bnext_tiny"
    with pytest.raises(CheckpointError, match="does not fit this BNext-S"):
        model_from_checkpoint(str(path), {"arch": "bnext_small"})


# --- BNext's evaluation transform: timm's bicubic resize to floor(S / 0.95), centre crop ---

def timm_eval_pixels(path, size, crop_pct=0.95, interpolation=transforms.InterpolationMode.BICUBIC):
    """The uint8 (S, S, 3) pixels of timm's evaluation transform, written with torchvision."""
    from PIL import Image
    pipeline = transforms.Compose([transforms.Resize(math.floor(size / crop_pct), interpolation),
                                   transforms.CenterCrop(size)])
    return np.asarray(pipeline(Image.open(path).convert("RGB")))


def test_bnext_validation_pixels_are_timms(tiny_data):
    dataset = open_split(tiny_data, "val", RunSpec(image_size=32, crop_pct=0.95, interpolation="bicubic", resize_rounding="floor"))
    default = open_split(tiny_data, "val", RunSpec(image_size=32))
    for index, (path, _) in enumerate(dataset.samples):
        pixels = dataset[(index, 0)].pixels
        assert np.array_equal(pixels, timm_eval_pixels(path, 32))
        assert not np.array_equal(pixels, default[(index, 0)].pixels)


def test_gpu_backend_resizes_bicubic_too(tmp_path):
    # JPEGs that the device decodes, then resizes; PIL's bicubic rounds a little differently.
    data = write_image_folder(tmp_path, {"val": 2}, size=(47, 41), image_format="JPEG")
    validation = RunSpec(image_size=32, crop_pct=0.95, interpolation="bicubic", resize_rounding="floor")
    pil, gpu = (make_loader(open_split(data, "val", validation, backend),
                            SeededSampler(6, shuffle=False), 6, 0, False) for backend in ("pil", "gpu"))
    (want,), (batch,) = list(pil), list(gpu)
    images = batch.decode(torch.device("cpu"))
    assert all(batch.on_device) and images.shape == (6, 3, 32, 32)
    difference = (images.int() - want.decode(torch.device("cpu")).int()).abs()
    assert difference.float().mean() < 0.5 and difference.max() <= 2
    bilinear = open_split(data, "val", RunSpec(image_size=32, crop_pct=0.95, interpolation="bilinear", resize_rounding="floor"))
    assert not np.array_equal(bilinear[(0, 0)].pixels, want.pixels[0].numpy())


def evaluated_loss(model, tiny_data, validation):
    """The mean cross-entropy over tiny_data's val split with ``validation``, as evaluate.py prints it."""
    dataset = open_split(tiny_data, "val", validation)
    images = torch.stack([torch.from_numpy(dataset[(i, 0)].pixels.copy()).permute(2, 0, 1)
                          for i in range(len(dataset))])
    target = torch.tensor([t for _, t in dataset.samples])
    with torch.no_grad():
        logits = model.eval()(normalise(images.float(), validation))
    return f"{F.cross_entropy(logits, target).item():.4e}"


def printed_loss(output):
    return re.findall(r"Loss (\S+) \(", output)[-1]


@pytest.mark.slow
@pytest.mark.parametrize("flags, validation", [
    ([], RunSpec(image_size=32, crop_pct=0.95, interpolation="bicubic", resize_rounding="floor")),
    (["--interpolation", "bilinear", "--crop_pct", "0.875"], RunSpec(image_size=32, crop_pct=0.875, interpolation="bilinear", resize_rounding="floor")),
])
def test_evaluate_released_file_with_bnext_transform_unless_flags_say_otherwise(released, tiny_data, flags,
                                                                                 validation):
    path, model = released
    result = succeeded(run_script("evaluate.py", *evaluate_args(tiny_data, path), "--arch", "bnext_tiny",
                                  "--image_size", 32, "--batch_size", 16, "--print_freq", 1, *flags))
    assert "(BNext-T) as step 2" in result.stdout
    assert f"({validation.describe_evaluation()})" in result.stdout
    # The whole split is one batch: the printed loss is the split's, computed here with the transform.
    assert printed_loss(result.stdout) == evaluated_loss(model, tiny_data, validation)
    others = [RunSpec(image_size=32), RunSpec(image_size=32, crop_pct=0.95, interpolation="bilinear", resize_rounding="floor")]
    assert all(evaluated_loss(model, tiny_data, other) != printed_loss(result.stdout)
               for other in others if other != validation)


def test_evaluate_refuses_a_crop_pct_out_of_range(released, tiny_data):
    result = run_script("evaluate.py", *evaluate_args(tiny_data, released[0]), "--arch", "bnext_tiny",
                        "--image_size", "32", "--crop_pct", "1.5")
    assert result.returncode == 2 and result.stderr == "error: --crop_pct must be in (0, 1], got 1.5\n"


# --- Costs ---

def bnext_costs_by_hand(widths, side=224, classes=1000):
    """BOPs: every binary conv at its output side (the 3x3 unit with the block's stride, the 1x1
    units C -> C at the same side). FLOPs: the stride-2 stem, the SE 1x1 convs on 1x1 maps, fc."""
    side //= 2
    stem = side * side * widths[0] * 3 * 9
    bops = se = 0
    for i in range(1, len(widths)):
        c = widths[i - 1]
        if widths[i - 1] != widths[i] and widths[i] != widths[1]:
            side //= 2
        pointwise = 1 if widths[i] == c else 2
        bops += side * side * c * c * (9 + pointwise)
        se += (1 + pointwise) * 2 * c * (c // 8)
    return bops, stem + se + widths[-1] * classes


def test_summary_prints_the_published_parameter_count_and_the_ops():
    result = succeeded(run_tool("summary", "--arch", "bnext_tiny"))
    assert result.stdout.startswith("BNext-T, step 2 (binary weights), 1000 classes, 224x224 input\n")
    totals = {line.split(":")[0]: line.split()[1] for line in result.stdout.splitlines()[-5:]}
    bops, flops = bnext_costs_by_hand(WIDTHS["tiny"])
    assert totals["params"] == "30,862,236"
    assert (totals["BOPs"], totals["FLOPs"]) == (f"{bops:,}", f"{flops:,}")
    assert totals["OPs"] == f"{round(bops / 64 + flops):,}"


@pytest.mark.parametrize("size", ["small", "middle", "large"])
def test_costs_of_every_size_by_hand(size):
    with torch.device("meta"):  # shapes are all the count needs
        model = build_model(bnext_spec(f"bnext_{size}", 1000, True))
        counts = count_ops(model, 224)
    assert (counts["bops"], counts["flops"]) == bnext_costs_by_hand(WIDTHS[size])
    assert counts["params"] == PARAMETERS[size]


# --- The paper's measurements on its binary units ---

def test_flip_flop_c2i_and_saturation_on_bnext_units():
    torch.manual_seed(0)
    model = build_model(bnext_spec("bnext_tiny", NUM_CLASSES, True))
    metrics = PaperMetrics(model)
    layers = binary_convs(model)
    assert len(layers) == sum(1 + (1 if w == v else 2) for v, w in zip(WIDTHS["tiny"], WIDTHS["tiny"][1:]))
    # Flip the signs of a known number of latent weights as an optimizer step would.
    with torch.no_grad():
        layers[0][1].weight.view(-1)[:5].neg_()
        layers[-1][1].weight.view(-1)[:3].neg_()
    metrics.after_step()
    # Saturation: the share of inputs of the binary activations beyond 1.5, where bnext_sign's
    # straight-through gradient is 0.
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
             for m in model.modules() if type(m).__name__ == "HardSign"]
    x = torch.randn(2, 3, 32, 32) * 3
    with metrics.sample_saturation():
        model(x)
    for hook in hooks:
        hook.remove()
    summary = metrics.epoch_summary()
    total = sum(m.weight.numel() for _, m in layers)
    assert summary["flip_flop"] == pytest.approx(8 / total)
    assert summary["c2i"] == pytest.approx(1 - 2 * 8 / total)
    beyond = sum((t.abs() > 1.5).sum().item() for t in inputs) / sum(t.numel() for t in inputs)
    beyond_one = sum((t.abs() > 1).sum().item() for t in inputs) / sum(t.numel() for t in inputs)
    assert summary["saturation"] == pytest.approx(beyond) and beyond != pytest.approx(beyond_one)


def test_lce_export_refuses_bnext_in_one_line(tmp_path, capsys):
    path = tmp_path / "bnext.pth"
    model = build_model(bnext_spec("bnext_tiny", NUM_CLASSES, True))
    torch.save({"state_dict": model.state_dict(), "step": 2, **model.spec.as_dict()}, path)
    line = main_error_line(export_lce.main, ["--checkpoint", path, "--data", tmp_path], capsys)
    assert line == (f"error: {path} holds a BNext-T (--arch bnext_tiny): the LCE export maps only "
                    f"ReActNet-A's topology (reactnet_a)")
    assert os.listdir(tmp_path) == ["bnext.pth"]
