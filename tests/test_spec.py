"""The RunSpec: resolved once from the architecture's defaults, the checkpoint and the flags given,
saved with every run and read back by every command with no flag."""
import json

import pytest
import torch

import evaluate
from conftest import NUM_CLASSES, main_error_line
from models import RunSpec, build_model
from models.registry import ARCHITECTURES, RegistryError, register_architecture
from models.spec import ARCHITECTURE_FIELDS, recorded_fields, resolve
from models.reactnet import reactnet
from tools import summary


def reactnet_a_again(num_classes, binary_weights):
    return reactnet(num_classes, binary_weights)


@pytest.fixture(scope="module", autouse=True)
def architectures_with_defaults():
    """Two architectures registered with defaults for this module's tests, then removed."""
    register_architecture("spec_test_net", title="SpecTestNet",
                          defaults={"image_size": 64, "interpolation": "bicubic"})(reactnet_a_again)
    register_architecture("spec_test_bad_defaults", title="Bad", defaults={"num_classes": 10})(reactnet_a_again)
    yield
    for name in ("spec_test_net", "spec_test_bad_defaults"):
        del ARCHITECTURES[name]


def test_defaults_then_architecture_then_checkpoint_then_flags():
    assert resolve({}) == (RunSpec(), {})
    spec, _ = resolve({"arch": "spec_test_net"})
    assert (spec.image_size, spec.interpolation, spec.crop_pct) == (64, "bicubic", RunSpec.crop_pct)
    recorded = {"arch": "spec_test_net", "image_size": 32, "crop_pct": 0.9}
    spec, overrides = resolve({"image_size": None, "crop_pct": 0.9}, recorded)
    assert (spec.image_size, spec.interpolation, spec.crop_pct, overrides) == (32, "bicubic", 0.9, {})
    spec, overrides = resolve({"image_size": 48, "mean": [0.5, 0.5, 0.5]}, recorded)
    assert (spec.image_size, spec.mean) == (48, (0.5, 0.5, 0.5))
    assert overrides == {"image_size": (32, 48)}  # the mean was not recorded: nothing overridden


def test_an_architecture_may_not_default_what_the_run_fixes():
    assert "num_classes" not in ARCHITECTURE_FIELDS and "interpolation" in ARCHITECTURE_FIELDS
    with pytest.raises(RegistryError, match="'spec_test_bad_defaults' registers defaults for num_classes"):
        resolve({"arch": "spec_test_bad_defaults"})


def test_what_a_checkpoint_records_and_what_older_ones_did():
    spec = RunSpec(image_size=48, mean=(0.1, 0.2, 0.3), num_classes=3, step=1)
    saved = {"state_dict": {}, "args": {"image_size": 999}, **spec.as_dict()}
    assert recorded_fields(saved) == spec.as_dict()
    # Through JSON (args.json) the tuples come back as lists.
    assert recorded_fields(json.loads(json.dumps(spec.as_dict()))) == spec.as_dict()
    # Before every field was recorded: the model's names, and the image size among the arguments.
    older = {"arch": "reactnet_18", "act_binarizer": "ste", "step": 2, "args": {"image_size": 32}}
    assert recorded_fields(older) == {"arch": "reactnet_18", "act_binarizer": "ste", "step": 2, "image_size": 32}
    assert recorded_fields({"state_dict": {}, "epoch": 3}) == {}  # a released file


def test_evaluate_takes_the_checkpoints_spec_and_reports_an_override(tiny_data, tmp_path, capsys):
    spec = RunSpec(image_size=32, crop_pct=0.9, num_classes=NUM_CLASSES, step=1)
    path = tmp_path / "run.pth.tar"
    torch.save({"state_dict": build_model(spec).state_dict(), **spec.as_dict()}, path)
    flags = ["--data", tiny_data, "--checkpoint", str(path), "-j", "0", "--device", "cpu"]
    evaluate.main(flags)
    out = capsys.readouterr().out
    assert "as step 1 on 12 images" in out and "at 32 px" in out and "overrides" not in out
    evaluate.main(flags + ["--image_size", "64", "--crop_pct", "0.9"])
    out = capsys.readouterr().out
    assert out.startswith("=> --image_size 64 overrides the checkpoint's 32\n=> evaluating") and "at 64 px" in out
    line = main_error_line(evaluate.main, flags + ["--crop_pct", "1.5"], capsys)
    assert line == "error: --crop_pct must be in (0, 1], got 1.5"


def test_summary_counts_at_the_architectures_own_size(capsys):
    summary.main(["--arch", "spec_test_net", "--num_classes", "10"])
    assert capsys.readouterr().out.startswith("SpecTestNet, step 2 (binary weights), 10 classes, 64x64 input\n")
