"""tools/ablation.py: the grid, the run plan, the table, and one real run of the whole tool."""
import json
import os

import pytest
import torch
import torchvision
from conftest import main_error_line, write_image_folder

from tools.ablation import COLUMNS, CONFIGS, GridRow, main, plan, read_metrics, summarize, table


def by_name(name):
    return next(c for c in CONFIGS if c.name == name)


def test_grid_covers_the_papers_ablation():
    names = [c.name for c in CONFIGS]
    assert len(set(names)) == len(names)
    rows = {(c.optimizer, c.schedule, c.step1_weight_decay, c.step2_weight_decay) for c in CONFIGS}
    two_step_adam = {("adam", "two-step", wd, 0.0) for wd in (1e-5, 5e-6, 0.0)}
    one_step_adam = {("adam", "one-step", None, wd) for wd in (1e-5, 5e-6, 0.0)}
    assert rows == two_step_adam | one_step_adam | {("sgd", "two-step", 5e-6, 0.0)}


def test_plan_shares_step1_runs_and_doubles_one_step_epochs():
    runs = plan(CONFIGS, 3, "/runs")
    names = [r.name for r in runs]
    assert len(set(names)) == len(names)
    step1 = [r for r in runs if r.script == "step1/train.py"]
    # One per (optimizer, step-1 weight decay): Adam at 1e-5, 5e-6 and 0, SGD at 5e-6.
    assert len(step1) == 4
    assert len(runs) == 4 + len(CONFIGS)
    for config in CONFIGS:
        run = runs[names.index(config.name)]
        start = run.flags[run.flags.index("--step1_checkpoint") + 1]
        if config.two_step:
            assert names.index(config.step1_name) < names.index(config.name)
            assert start == f"/runs/{config.step1_name}/model_best.pth.tar"
            assert run.epochs == 3
        else:
            assert start == "none"
            assert run.epochs == 6



def test_plan_gives_each_optimizer_its_learning_rate():
    runs = plan(CONFIGS, 3, "/runs", {"sgd": 0.05})
    for run in runs:
        optimizer = run.flags[run.flags.index("--optimizer") + 1]
        if optimizer == "sgd":
            assert run.flags[run.flags.index("--learning_rate") + 1] == "0.05"
        else:
            assert "--learning_rate" not in run.flags

def write_metrics(folder, records):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def record(epoch, top1, flip_flop, c2i=0.9, saturation=0.25, first=0.4):
    return {"epoch": epoch, "val_top1": top1, "flip_flop": flip_flop, "c2i": c2i,
            "saturation": saturation, "saturation_per_layer": {"feature.1.binary_3x3": first}}


def parse_table(text):
    lines = text.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return header, [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_table_from_metrics_files(tmp_path):
    adam, sgd, missing = by_name("adam_twostep_wd5e-6_0"), by_name("sgd_twostep_wd5e-6_0"), CONFIGS[0]
    write_metrics(tmp_path / adam.name, [
        record(0, 40.0, 0.004),
        record(1, 55.0, 0.010),   # interrupted after logging: epoch 1 was trained and logged again
        record(1, 50.0, 0.002),
        record(2, 45.0, 0.003, c2i=0.625, saturation=0.238, first=0.5),
    ])
    write_metrics(tmp_path / sgd.name, [{"epoch": 0, "val_top1": 30.0}])  # trained with --no_metrics

    header, rows = parse_table(table(CONFIGS, str(tmp_path)))
    assert header == COLUMNS
    assert [r["configuration"] for r in rows] == [adam.name, sgd.name]  # grid order; no row for missing
    assert missing.name not in {r["configuration"] for r in rows}

    a = rows[0]
    assert (a["optimizer"], a["schedule"], a["weight decay"]) == ("adam", "two-step", "5e-6 -> 0")
    assert a["epochs (final step)"] == "3"
    assert a["final acc@1 (%)"] == "45.00"
    assert a["best acc@1 (%)"] == "50.00"  # the superseded 55.0 record no longer counts
    assert float(a["mean flip-flop"]) == pytest.approx((0.004 + 0.002 + 0.003) / 3, rel=1e-3)
    assert a["final C2I"] == "0.6250"
    assert a["saturation (%)"] == "23.8"
    assert a["saturation, first binary layer (%)"] == "50.0"
    assert a["paper acc@1 (%, reported)"] == "63.23"

    s = rows[1]
    assert (s["optimizer"], s["weight decay"], s["final acc@1 (%)"]) == ("sgd", "5e-6 -> 0", "30.00")
    assert s["paper acc@1 (%, reported)"] == "61.25"
    assert s["mean flip-flop"] == s["final C2I"] == s["saturation (%)"] == "n/a"


def test_summary_of_one_step_run(tmp_path):
    config = GridRow("adam", None, 1e-5)
    assert (config.schedule, config.weight_decays, config.name) == ("one-step", "1e-5", "adam_onestep_wd1e-5")
    write_metrics(tmp_path, [record(0, 10.0, 0.02), record(1, 20.0, 0.04)])
    summary = summarize(read_metrics(str(tmp_path)))
    assert summary["mean_flip_flop"] == pytest.approx(0.03)
    assert summary["saturation_first"] == pytest.approx(40.0)


def test_missing_data_is_one_line_error(tmp_path, capsys):
    line = main_error_line(main, ["--data", tmp_path / "nope", "--out", tmp_path / "out"], capsys)
    assert line.startswith("error: data folder")



def test_a_non_positive_learning_rate_is_one_line_error(tmp_path, capsys):
    line = main_error_line(main, ["--data", tmp_path, "--out", tmp_path / "out", "--sgd_learning_rate", 0],
                           capsys)
    assert line.startswith("error: --sgd_learning_rate must be positive")

@pytest.mark.slow
def test_end_to_end_two_step_run_of_reactnet18_then_skip(tmp_path, capsys, monkeypatch):
    # The tool runs in this process (saving an interpreter start); the train scripts are subprocesses.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = write_image_folder(tmp_path / "data", {"train": 4, "val": 2}, num_classes=2)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), teacher)
    out = tmp_path / "ablation"
    config = by_name("adam_twostep_wd5e-6_0")
    # 2 epochs per step: epoch 0 of each step updates the weights (at lr / 2), epoch 1 runs at 0.
    args = ["--data", data, "--out", str(out), "--epochs", "2", "--batch_size", "8", "--image_size", "32",
            "-j", "0", "--teacher", "resnet18", "--teacher_weights", str(teacher), "--only", config.name,
            "--arch", "reactnet_18", "--", "--device", "cpu"]

    main(args)
    first = capsys.readouterr().out
    assert sorted(os.listdir(out / "runs")) == sorted([config.step1_name, config.name])
    step1_best = out / "runs" / config.step1_name / "model_best.pth.tar"
    step2_log = (out / "runs" / config.name / "log.txt").read_text()
    assert f"initialised from step-1 weights {step1_best}" in step2_log
    report = (out / "ablation.md").read_text()
    assert report.startswith(f"# AdamBNN ablation: ReActNet-18 trained on {data}, 2 epochs per step\n")
    printed = table(CONFIGS, str(out / "runs"))
    assert printed in report and printed in first
    _, rows = parse_table(printed)
    assert [r["configuration"] for r in rows] == [config.name]
    assert rows[0]["epochs (final step)"] == "2"
    assert rows[0]["saturation (%)"] != "n/a" and float(rows[0]["mean flip-flop"]) > 0
    # C2I of step 2: sign agreement of its final binary weights with the step-1 weights it started
    # from, computed here from the two checkpoint files.
    start = torch.load(step1_best, weights_only=True)["state_dict"]
    last = torch.load(out / "runs" / config.name / "checkpoint.pth.tar", weights_only=True)
    assert last["arch"] == torch.load(step1_best, weights_only=True)["arch"] == "reactnet_18"
    end = last["state_dict"]
    binary = [k for k in start if ".binary_" in k]
    assert len(binary) == 16  # one binary 3x3 conv per ReActNet-18 block
    differing = sum((torch.sign(start[k]) != torch.sign(end[k])).sum().item() for k in binary)
    c2i = 1 - 2 * differing / sum(start[k].numel() for k in binary)
    assert c2i < 0.9999  # the weights moved: the table cannot show 1.0000
    assert float(rows[0]["final C2I"]) == pytest.approx(c2i, abs=6e-5)  # printed to 4 decimals

    main(args)
    assert capsys.readouterr().out.count("already done") == 2
    assert (out / "ablation.md").read_text() == report
