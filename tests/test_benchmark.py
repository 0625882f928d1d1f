"""python -m tools.benchmark on tiny settings: a complete report, and a baseline that trains like ours."""
import json

import pytest
import torch
import torchvision

from conftest import main_error_line
from models import reactnet
from tools import benchmark
from tools.bench.compute import RecipeStepBenchmark, TrainingRun, resolve
from tools.bench.end_to_end import decode_options
from tools.bench.variants import parse_variant
from utils.pipeline import jpeg_decoder_for

TINY = ["--image_size", "32", "--batch_size", "4", "--steps", "2", "--warmup", "1", "--repeats", "1",
        "--num_classes", "10", "--teacher", "resnet18"]


@pytest.mark.slow
def test_report_has_every_configuration(tmp_path, capsys):
    # bf16 and compile are left out of this test only because they take minutes on a CPU (bf16
    # convolutions without bf16 hardware, compilation); "fastest" still runs the probe logic.
    configs = ["baseline", "ours", "ours+metrics", "ours+channels_last", "ours+fused_adam", "fastest"]
    out = tmp_path / "report.json"
    report = benchmark.main([*TINY, "--recipe_steps", "2", "--configs", *configs,
                             "--fastest_from", "channels_last", "fused_adam",
                             "--loader", "--loader_images", "12", "--loader_image_size", "32",
                             "--end_to_end", "--end_to_end_configs", "ours", "fastest",
                             "--cpu_decode_shares", "0", "0.5",
                             "--end_to_end_workers", "0", "--end_to_end_iterations", "2",
                             "--out", str(out)])

    rows = report["training"]
    fastest = [row for row in rows if row["fastest"]]
    assert len(fastest) == 1
    assert {row["config"] for row in rows} >= set(configs[:-1]) | {fastest[0]["config"]}
    for row in rows:
        assert row["skipped"] is None
        for key in ("images_per_s", "images_per_cpu_s", "peak_bytes", "saved_bytes", "speedup",
                    "cpu_speedup", "peak_ratio", "saved_ratio"):
            assert row[key] > 0, (row["config"], key)
    baseline = next(row for row in rows if row["config"] == "baseline")
    assert baseline["speedup"] == baseline["peak_ratio"] == baseline["saved_ratio"] == 1.0
    assert [(row["backend"], row["workers"]) for row in report["loader"]] == [
        (backend, workers) for backend in ("pil", "gpu") for workers in (0, 1, 2)]
    assert all(row["images_per_s"] > 0 for row in report["loader"])
    fed = report["end_to_end"]
    # The end-to-end rows train the configuration the compute table chose: one probe per step.
    # The gpu rows decode with the decoder that training would choose.
    decoder = jpeg_decoder_for("gpu")
    assert [(row["backend"], row["jpeg_decoder"], row["cpu_decode_share"], row["config"]) for row in fed] == [
        (backend, decoder, share, config) for backend, decoder, share in (
            ("pil", None, None), ("gpu", decoder, 0), ("gpu", decoder, 0.5))
        for config in ("ours", fastest[0]["config"])]
    for row in fed:
        assert row["images_per_s"] > 0 and row["speedup"] > 0 and 0 < row["data_wait_share"] < 1

    table = capsys.readouterr().out
    assert "| baseline | 2 |" in table and "| 1.00 |" in table
    assert f"| fastest = {fastest[0]['config']} | 2 |" in table
    assert f"| ours | 2 | pil |  |  | {fed[0]['images_per_s']:.1f} |" in table
    assert f"| ours | 2 | gpu | {decoder} | 0 | {fed[2]['images_per_s']:.1f} |" in table
    assert f"| ours | 2 | gpu | {decoder} | 0.5 | {fed[4]['images_per_s']:.1f} |" in table
    assert json.loads(out.read_text())["training"] == json.loads(json.dumps(rows))


def test_end_to_end_rows_of_the_gpu_backend_cover_each_decoder_and_share():
    args = benchmark.build_parser().parse_args([*TINY, "--jpeg_decoders", "torchvision", "torchcodec",
                                                "--cpu_decode_shares", "0", "0.4"])
    assert decode_options(args) == [("pil", None, None), ("gpu", "torchvision", 0), ("gpu", "torchvision", 0.4),
                                    ("gpu", "torchcodec", 0), ("gpu", "torchcodec", 0.4)]


def test_the_fastest_configuration_is_probed_once_per_step(monkeypatch):
    # A machine whose load changes after the first probe (ours, channels_last, ours, fused Adam,
    # ours): channels_last wins that one, fused Adam would win any later one. Every table must
    # still get the first probe's choice.
    probes = []

    def timed_under_changing_load(run, iterations):
        probes.append(run.variant.name)
        favoured = "ours+channels_last" if len(probes) <= 5 else "ours+fused_adam"
        rate = 12.0 if run.variant.name == favoured else 10.0
        return {"wall": rate, "cpu": rate}

    monkeypatch.setattr(TrainingRun, "time", timed_under_changing_load)
    args = benchmark.build_parser().parse_args([*TINY, "--fastest_from", "channels_last", "fused_adam"])
    bench = RecipeStepBenchmark(args, 2, torch.device("cpu"), log=lambda message: None)
    first = resolve(bench, ["fastest"])
    timed = len(probes)
    assert first == [parse_variant("ours+channels_last")]
    assert resolve(bench, ["ours", "fastest"]) == [parse_variant("ours"), *first]
    assert len(probes) == timed


@pytest.mark.parametrize("step", [1, 2])
def test_baseline_and_ours_agree_on_the_first_batch(step):
    torch.manual_seed(0)
    student = reactnet(10, binary_weights=step == 2)
    teacher = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    teachers = {(nhwc, compiled): teacher for nhwc in (False, True) for compiled in (False, True)}
    images, target = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    runs = [TrainingRun(parse_variant(name), student, teachers, images, target,
                                  torch.device("cpu")) for name in ("baseline", "ours")]
    losses = [run.iteration() for run in runs]

    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=0)
    published, ours = (dict(run.student.named_parameters()) for run in runs)
    for name, param in ours.items():
        torch.testing.assert_close(published[name].grad, param.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


def test_metrics_configuration_measures_flips_without_changing_training():
    torch.manual_seed(0)
    student = reactnet(10, binary_weights=True)
    teacher = torchvision.models.resnet18(num_classes=10).eval().requires_grad_(False)
    images, target = torch.randn(4, 3, 32, 32), torch.randint(10, (4,))
    runs = [TrainingRun(parse_variant(name), student, {(False, False): teacher}, images, target,
                                  torch.device("cpu")) for name in ("ours", "ours+metrics")]
    for _ in range(3):
        losses = [run.iteration() for run in runs]
        assert losses[0] == losses[1]
    assert runs[0].paper_metrics is None
    summary = runs[1].paper_metrics.epoch_summary()
    assert runs[1].paper_metrics.steps == 3 and summary["flip_flop"] > 0


def test_configuration_names():
    assert parse_variant("baseline").published
    config = parse_variant("ours+compile+bf16")
    assert config.name == "ours+bf16+compile" and config.compile and config.bf16
    assert parse_variant("ours+metrics+fused_adam").name == "ours+fused_adam+metrics"
    with pytest.raises(ValueError, match="unknown configuration"):
        parse_variant("ours+fp16")


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "16"], "--image_size 16 is too small"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--configs", "ours+fp16"], "unknown configuration"),
    (["--cpu_decode_shares", "0", "1.5"], "--cpu_decode_shares must be in [0, 1], got 1.5"),
])
def test_bad_settings_are_refused_in_one_line(flags, message, capsys):
    assert message in main_error_line(benchmark.main, flags, capsys)
