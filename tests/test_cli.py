"""The command lines end to end on tiny data: step 1 -> step 2 -> evaluate, run.sh, bad input."""
import os
import re

import pytest
import torch
import torchvision

from conftest import (NUM_CLASSES, evaluate_args, last_val_line, run_script, run_sh,
                      single_error_line, succeeded, train_args, write_image_folder)

BEST = "model_best.pth.tar"


def read(path):
    with open(path) as f:
        return f.read()


def logged_val_line(run_folder):
    return last_val_line(read(os.path.join(run_folder, "log.txt")))


def learned_parameters(state_dict):
    return {k: v for k, v in state_dict.items() if "running" not in k and "num_batches" not in k}


@pytest.fixture(scope="module")
def pipeline(tiny_data, teacher_weights, tmp_path_factory):
    """Step 1 by run.sh from another cwd into a relative SAVE, step 2 from its best, evaluate both."""
    root = tmp_path_factory.mktemp("pipeline")
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    step1_dir, step2_dir = str(elsewhere / "step1_run"), str(root / "step2_run")
    step1_env = {"DATA": tiny_data, "EPOCHS": "1", "BATCH_SIZE": "8", "IMAGE_SIZE": "32",
                 "TEACHER": "resnet18", "TEACHER_WEIGHTS": teacher_weights, "WORKERS": "0",
                 "SAVE": "step1_run", "NGPUS": "1",
                 # Exported for step 2 by some job scripts: step 1 must not pass it on.
                 "STEP1_CHECKPOINT": "/nowhere/model_best.pth.tar"}
    # Extra arguments go to train.py: the CPU keeps the logged accuracy comparable to evaluate's.
    step1 = run_sh(1, step1_env, "--device", "cpu", cwd=str(elsewhere))
    step1_best = os.path.join(step1_dir, BEST)
    step2 = run_script("step2/train.py", *train_args(tiny_data, teacher_weights, step2_dir,
                                                     "--step1_checkpoint", step1_best))
    step2_best = os.path.join(step2_dir, BEST)
    evaluate2 = run_script("evaluate.py", *evaluate_args(tiny_data, step2_best))
    evaluate1 = run_script("evaluate.py", *evaluate_args(tiny_data, step1_best), cwd=str(elsewhere))
    return {"step1": step1, "step2": step2, "evaluate1": evaluate1, "evaluate2": evaluate2,
            "step1_dir": step1_dir, "step2_dir": step2_dir, "step1_best": step1_best,
            "step2_best": step2_best, "tiny_data": tiny_data, "teacher_weights": teacher_weights}


@pytest.mark.slow
def test_step1_run_sh_from_another_cwd_writes_its_log(pipeline):
    result = succeeded(pipeline["step1"])
    log = read(os.path.join(pipeline["step1_dir"], "run.log"))
    assert "learning_rate:" in log and last_val_line(log) == last_val_line(result.stdout)
    assert last_val_line(log) == logged_val_line(pipeline["step1_dir"])
    assert os.path.isfile(pipeline["step1_best"])


@pytest.mark.slow
def test_step1_run_sh_passes_environment_as_flags(pipeline):
    args = torch.load(os.path.join(pipeline["step1_dir"], "checkpoint.pth.tar"), weights_only=True)["args"]
    expected = {"data": pipeline["tiny_data"], "epochs": 1, "batch_size": 8, "image_size": 32,
                "workers": 0, "teacher": "resnet18", "teacher_weights": pipeline["teacher_weights"],
                "weight_decay": 5e-6, "device": "cpu", "optimizer": "adam", "learning_rate": 1.25e-3}
    assert {k: args[k] for k in expected} == expected


@pytest.mark.slow
@pytest.mark.parametrize("variables, extra, rate", [
    ({"OPTIMIZER": "sgd"}, [], 0.1),
    ({}, ["--optimizer", "sgd"], 0.1),  # an extra argument overrides the variable's optimizer
    ({"OPTIMIZER": "sgd", "LEARNING_RATE": "0.05"}, [], 0.05),
], ids=["variable", "extra_argument", "rate_set"])
def test_run_sh_rate_follows_the_optimizer_unless_set(teacher_weights, tmp_path, variables, extra, rate):
    data = write_image_folder(tmp_path / "data", {"train": 1, "val": 1})
    env = {"DATA": data, "EPOCHS": "1", "BATCH_SIZE": "3", "IMAGE_SIZE": "32", "TEACHER": "resnet18",
           "TEACHER_WEIGHTS": teacher_weights, "WORKERS": "0", "SAVE": str(tmp_path / "run"),
           "NGPUS": "1", **variables}
    succeeded(run_sh(1, env, "--device", "cpu", "--no_metrics", *extra, cwd=str(tmp_path)))
    state = torch.load(tmp_path / "run" / "checkpoint.pth.tar", weights_only=True)
    assert state["args"]["optimizer"] == "sgd" and state["args"]["learning_rate"] == rate
    # What trained: SGD's momentum buffers, and the base rate the schedule decays.
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert [g["initial_lr"] for g in state["optimizer"]["param_groups"]] == [rate, rate]


@pytest.mark.slow
def test_step2_starts_from_step1_best(pipeline):
    succeeded(pipeline["step2"])
    assert f"initialised from step-1 weights {pipeline['step1_best']}" in pipeline["step2"].stdout
    # With --epochs 1 the only epoch trains at lr * (1 - 1/1) = 0 (the schedule is stepped at the start of each epoch), so step 2
    # ends with step 1's learned parameters unchanged; only BatchNorm statistics moved.
    step1 = torch.load(pipeline["step1_best"], weights_only=True)
    step2 = torch.load(pipeline["step2_best"], weights_only=True)
    assert step2["step"] == 2 and step1["step"] == 1
    before, after = learned_parameters(step1["state_dict"]), learned_parameters(step2["state_dict"])
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_evaluate_reproduces_step2_validation(pipeline):
    result = succeeded(pipeline["evaluate2"])
    assert "as step 2" in result.stdout
    assert last_val_line(result.stdout) == logged_val_line(pipeline["step2_dir"])


@pytest.mark.slow
def test_evaluate_reads_step1_from_metadata_from_another_cwd(pipeline):
    result = succeeded(pipeline["evaluate1"])
    assert "as step 1" in result.stdout
    assert last_val_line(result.stdout) == logged_val_line(pipeline["step1_dir"])


# --- Bad input: one line on stderr, starting with 'error:', no traceback ---

@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """Data folders each broken in one way."""
    root = tmp_path_factory.mktemp("bad_data")
    folders = {}
    folders["only_val"] = write_image_folder(root / "only_val", {"val": 1})
    folders["empty_split"] = write_image_folder(root / "empty_split", {"train": 1})
    for k in range(NUM_CLASSES):
        os.makedirs(os.path.join(folders["empty_split"], "val", f"class_{k}"))
    folders["other_classes"] = write_image_folder(root / "other_classes", {"train": 1, "val": 1})
    os.rename(os.path.join(folders["other_classes"], "val", "class_2"),
              os.path.join(folders["other_classes"], "val", "class_9"))
    return folders


def step1_error(data, teacher, save, *extra):
    return single_error_line(run_script("step1/train.py", *train_args(data, teacher, save, *extra)))


def test_missing_data_folder(teacher_weights, tmp_path):
    missing = str(tmp_path / "no_such_data")
    assert missing in step1_error(missing, teacher_weights, str(tmp_path / "run"))


def test_data_folder_without_train(teacher_weights, bad_data, tmp_path):
    line = step1_error(bad_data["only_val"], teacher_weights, str(tmp_path / "run"))
    assert "train" in line  # the message's own word: the folder's path does not hold it


def test_data_folder_with_empty_split(teacher_weights, bad_data, tmp_path):
    line = step1_error(bad_data["empty_split"], teacher_weights, str(tmp_path / "run"))
    assert os.path.join(bad_data["empty_split"], "val") in line


def test_train_and_val_classes_differ(teacher_weights, bad_data, tmp_path):
    line = step1_error(bad_data["other_classes"], teacher_weights, str(tmp_path / "run"))
    assert "class_9" in line and "class_2" in line


@pytest.mark.slow
@pytest.mark.parametrize("flags, words", [
    (["--batch_size", 0], ["--batch_size"]),
    (["--epochs", -1], ["--epochs"]),
    (["--image_size", 16], ["--image_size", "16"]),
    (["--cpu_decode_share", 1.5], ["--cpu_decode_share", "1.5"]),
], ids=["batch_size_0", "negative_epochs", "image_size_16", "cpu_decode_share_1.5"])
def test_bad_numbers(tiny_data, teacher_weights, tmp_path, flags, words):
    line = step1_error(tiny_data, teacher_weights, str(tmp_path / "run"), *flags)
    assert all(word in line for word in words), line


@pytest.mark.slow
def test_unwritable_save(tiny_data, teacher_weights, tmp_path):
    regular_file = tmp_path / "a_file"
    regular_file.write_text("not a folder")
    save = str(regular_file / "run")
    assert save in step1_error(tiny_data, teacher_weights, save)


@pytest.mark.slow
def test_teacher_with_wrong_class_count(tiny_data, tmp_path):
    teacher = str(tmp_path / "teacher5.pth")
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), teacher)
    line = step1_error(tiny_data, teacher, str(tmp_path / "run"))
    assert teacher in line and "5" in line and str(NUM_CLASSES) in line


@pytest.mark.slow
def test_missing_step1_checkpoint(tiny_data, teacher_weights, tmp_path):
    missing = str(tmp_path / "nowhere" / BEST)
    result = run_script("step2/train.py", *train_args(tiny_data, teacher_weights, str(tmp_path / "run"),
                                                      "--step1_checkpoint", missing))
    line = single_error_line(result)
    assert missing in line and "step1/run.sh" in line


@pytest.mark.slow
def test_step2_refuses_to_resume_a_step1_folder(pipeline, tiny_data, teacher_weights):
    last = os.path.join(pipeline["step1_dir"], "checkpoint.pth.tar")
    written = os.stat(last).st_mtime_ns
    result = run_script("step2/train.py", *train_args(tiny_data, teacher_weights, pipeline["step1_dir"],
                                                      "--step1_checkpoint", pipeline["step1_best"]))
    line = single_error_line(result)
    assert "step 1" in line and "--save" in line
    assert os.stat(last).st_mtime_ns == written


@pytest.mark.slow
def test_evaluate_unreadable_checkpoint(pipeline, tiny_data, tmp_path):
    truncated = str(tmp_path / "truncated.pth.tar")
    with open(pipeline["step1_best"], "rb") as source, open(truncated, "wb") as target:
        target.write(source.read(1 << 20))
    line = single_error_line(run_script("evaluate.py", *evaluate_args(tiny_data, truncated)))
    assert truncated in line


@pytest.mark.slow
def test_evaluate_other_architecture(tiny_data, teacher_weights):
    line = single_error_line(run_script("evaluate.py", *evaluate_args(tiny_data, teacher_weights)))
    assert "missing" in line and "feature.0.conv1.weight" in line, line
    assert "unexpected" in line and re.search(r"(?<![\w.])conv1\.weight", line), line


def given(action, value):
    """The words that give ``action`` the value ``value``: ``--flag=value``, or for a flag of several
    values (``--mean R G B``) ``value`` last, where a leading ``-`` would read as another flag."""
    if isinstance(action.nargs, int):
        return [action.option_strings[-1], *["0"] * (action.nargs - 1), value.lstrip("-")]
    return [f"{action.option_strings[-1]}={value}"]


def test_every_float_flag_refuses_nan_infinity_and_beyond_float32(capsys):
    from tools.flag_docs import COMMANDS
    refused = set()
    for command in COMMANDS:
        parser = command.build_parser()
        for action in parser._actions:
            if action.type is not float:
                continue
            flag = "/".join(action.option_strings)
            for value in ("nan", "inf", "-inf", "-1e39"):
                words = given(action, value)
                with pytest.raises(SystemExit) as exit_info:
                    parser.parse_args(words)
                assert exit_info.value.code == 2
                reported = words[-1].split("=")[-1]
                # -1e39 is finite in float64 but not in float32, where Adam's update raises on it.
                reason = ("is beyond float32's range" if value == "-1e39" else
                          "is not a finite number: pass a finite value (see --help)\n")
                assert capsys.readouterr().err.startswith(f"error: argument {flag}: {reported} {reason}"), command.line
            refused.add(f"{command.line} {flag}")
    assert {"python step1/train.py --learning_rate", "python step1/train.py --weight_decay",
            "python step2/train.py --weight_decay", "python evaluate.py --max_unreadable_share",
            "python -m tools.landscape --span", "python -m tools.train_teacher --weight_decay",
            "python -m tools.ablation --adam_learning_rate", "python evaluate.py --crop_pct",
            "python evaluate.py --mean"} <= refused
