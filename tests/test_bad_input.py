"""Hostile data and settings: files that never end, symlink loops, decompression bombs, a last
batch of one, and bad settings of every entry point, each answered by a bounded read or one
``error:`` line."""
import errno
import io
import json
import os
import random
import shutil
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from conftest import (NUM_CLASSES, main_error_line, run_script, run_sh, single_error_line,
                      succeeded, train_args, write_image_folder)
from models import RunSpec, reactnet
from models.checkpoint import CheckpointError, read_checkpoint
from models.layers import binary_convs
from tools import ablation, summary
from utils import monitor, pipeline, run_folder, trainer
from utils.data import SeededImageFolder, SeededSampler
from utils.errors import UserError
from utils.monitor import MetricsLog
from utils.pipeline import UnreadableImage

BACKENDS = ["pil", "gpu"]


def jpeg_bytes(width=40, height=36):
    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


def one_class_folder(root, files):
    """``root/class_0/<name>``: bytes, or a callable that makes the entry at the path it is given."""
    folder = root / "class_0"
    folder.mkdir(parents=True)
    for name, content in files.items():
        if callable(content):
            content(str(folder / name))
        else:
            (folder / name).write_bytes(content)
    return str(root)


def read_all(dataset):
    """Every item of ``dataset`` by name, read in a thread so that a read that blocks fails the
    test instead of hanging it."""
    items = {}
    reader = threading.Thread(target=lambda: items.update(
        (os.path.basename(dataset.samples[i][0]), dataset[i, 0]) for i in range(len(dataset))), daemon=True)
    reader.start()
    reader.join(timeout=120)
    if reader.is_alive():
        for path, _ in dataset.samples:  # a writer end lets a blocked open of a FIFO return
            if os.path.exists(path) and not os.path.isfile(path) and not os.path.islink(path):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading the dataset blocked")
    return items


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_that_are_not_regular_are_unreadable_and_never_read(tmp_path, backend):
    root = one_class_folder(tmp_path, {"photo.JPEG": jpeg_bytes(),
                                       "endless.JPEG": lambda path: os.symlink("/dev/zero", path),
                                       "fifo.JPEG": os.mkfifo})
    items = read_all(SeededImageFolder(root, RunSpec(image_size=32), backend, train=True))
    assert not isinstance(items["photo.JPEG"], UnreadableImage)
    for name in ("endless.JPEG", "fifo.JPEG"):
        assert isinstance(items[name], UnreadableImage)
        assert "is not a regular file" in items[name].reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_over_the_size_bound_is_unreadable(tmp_path, backend, monkeypatch):
    image = jpeg_bytes()
    root = one_class_folder(tmp_path, {"photo.JPEG": image})
    dataset = SeededImageFolder(root, RunSpec(image_size=32), backend)
    monkeypatch.setattr(pipeline, "MAX_FILE_BYTES", len(image))
    assert not isinstance(dataset[0, 0], UnreadableImage)
    monkeypatch.setattr(pipeline, "MAX_FILE_BYTES", len(image) - 1)
    assert "larger than" in dataset[0, 0].reason


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_refuse_images_over_pils_pixel_limit(tmp_path, backend, monkeypatch):
    root = one_class_folder(tmp_path, {"photo.JPEG": jpeg_bytes(40, 36)})
    dataset = SeededImageFolder(root, RunSpec(image_size=32), backend)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 36)
    assert not isinstance(dataset[0, 0], UnreadableImage)
    # Below twice the limit PIL alone would only warn and decode.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 36 - 1)
    with pytest.warns(Image.DecompressionBombWarning):
        refused = dataset[0, 0]
    assert refused.reason.startswith("DecompressionBombError: 40x36 pixels")


def test_linked_folders_are_read_once_and_loops_are_not_followed(tmp_path):
    write_image_folder(tmp_path / "data", {"val": 2}, num_classes=2)
    val = tmp_path / "data" / "val"
    elsewhere = write_image_folder(tmp_path / "elsewhere", {"val": 1}, num_classes=1)
    os.symlink(".", val / "class_0" / "loop")                     # a loop
    os.symlink("../class_0", val / "class_1" / "class_0_again")   # a second way to the same folder
    os.symlink(os.path.join(elsewhere, "val", "class_0"), val / "class_1" / "linked")  # a new folder
    samples = SeededImageFolder(str(val), RunSpec(image_size=32)).samples
    names = [(os.path.relpath(path, val), target) for path, target in samples]
    assert names == [("class_0/0.png", 0), ("class_0/1.png", 0), ("class_1/0.png", 1),
                     ("class_1/1.png", 1), ("class_1/linked/0.png", 1)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_last_training_batch_of_one_is_dropped_on_every_rank(world_size):
    batch = 16
    size = (batch + 1) * world_size  # each rank's share ends in a batch of one
    samplers = [SeededSampler(size, 0, True, rank, world_size, batch) for rank in range(world_size)]
    for sampler in samplers:
        sampler.set_epoch(3)
        assert len(sampler) == len(list(sampler)) == batch
        sampler.set_epoch(3, start=batch)  # a resume after the first batch finds the epoch done
        assert len(sampler) == len(list(sampler)) == 0
    # A share that ends in a batch of two or more, and evaluation, keep every image.
    assert len(SeededSampler(size, 0, True, 0, world_size, batch + 1)) == batch + 1
    assert len(SeededSampler(batch + 1, 0, False, 0, 1)) == batch + 1


@pytest.mark.slow
def test_a_run_whose_last_batch_holds_one_image_trains(teacher_weights, tmp_path):
    # 17 images in batches of 16 at 32 px: BatchNorm saw a 1x1 map of a single image and failed.
    data = write_image_folder(tmp_path / "data", {"train": 6, "val": 2})
    os.remove(tmp_path / "data" / "train" / "class_2" / "5.png")
    result = succeeded(run_script("step1/train.py", *train_args(data, teacher_weights, tmp_path / "run",
                                                                batch_size=16)))
    assert "17 train / 6 val images" in result.stdout
    assert "Epoch: [0][0/1]" in result.stdout


def train_main(step):
    """Training's entry point, called in this process as main_error_line calls a tool's."""
    def main(argv):
        sys.argv = [f"step{step}/train.py", *argv]
        trainer.main(step)
    return main


@pytest.fixture
def restore_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def test_training_on_cuda_without_a_gpu_is_one_error_line(tiny_data, teacher_weights, tmp_path, capsys,
                                                          monkeypatch, restore_argv):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = train_args(tiny_data, teacher_weights, tmp_path) + ["--device", "cuda"]
    line = main_error_line(train_main(1), argv, capsys)
    assert line.startswith("error: --device cuda, but PyTorch sees no GPU")


def test_a_seed_torch_cannot_take_is_one_error_line(tiny_data, teacher_weights, tmp_path, capsys, restore_argv):
    argv = train_args(tiny_data, teacher_weights, tmp_path) + ["--seed", 2**70]
    line = main_error_line(train_main(1), argv, capsys)
    assert line == f"error: --seed must be between 0 and 2**64 - 1, got {2**70}"


def test_resuming_a_checkpoint_without_its_arguments_is_one_error_line(tiny_data, teacher_weights, tmp_path,
                                                                       capsys, restore_argv):
    torch.save({"step": 1, "num_classes": NUM_CLASSES, "epoch": 0}, tmp_path / "checkpoint.pth.tar")
    line = main_error_line(train_main(1), train_args(tiny_data, teacher_weights, tmp_path), capsys)
    assert line.startswith(f"error: {tmp_path}/checkpoint.pth.tar lacks iteration, state_dict, ")
    assert "cannot be resumed" in line


def test_a_step2_checkpoint_is_refused_as_the_step1_checkpoint(tiny_data, teacher_weights, tmp_path, capsys,
                                                               restore_argv):
    step2 = tmp_path / "step2.pth.tar"
    torch.save({"state_dict": reactnet(NUM_CLASSES, binary_weights=True).state_dict(), "step": 2,
                "num_classes": NUM_CLASSES}, step2)
    argv = train_args(tiny_data, teacher_weights, tmp_path / "run") + ["--step1_checkpoint", step2]
    line = main_error_line(train_main(2), argv, capsys)
    assert line.startswith(f"error: {step2} was made by step 2, not step 1")


def test_an_image_size_no_memory_holds_is_one_error_line(tiny_data, tmp_path, capsys):
    line = main_error_line(evaluate.main, ["--data", tiny_data, "--checkpoint", tmp_path / "any.pth",
                                           "--image_size", 10**9], capsys)
    assert line.startswith("error: --image_size 1000000000 is too large: use at most 4096")
    line = main_error_line(summary.main, ["--image_size", 100000], capsys)
    assert line.startswith("error: --image_size 100000 is too large")


def test_random_bytes_are_not_described_as_python_objects(tmp_path):
    path = tmp_path / "random.pth"
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError) as refused:
        read_checkpoint(str(path))
    assert "pickled Python objects" not in str(refused.value)
    assert "not what torch.save writes" in str(refused.value)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_when_the_event_file_opens_is_a_user_error(tmp_path, monkeypatch):
    # Simulated in this process: TensorBoard's file system layer fails its writes with ENOSPC.
    from tensorboard.compat.tensorflow_stub.io import gfile
    monkeypatch.setattr(gfile.LocalFileSystem, "write", disk_full)
    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", thread_errors.append)
    with pytest.raises(UserError, match="could not write the metrics in .*No space left on device"):
        MetricsLog(str(tmp_path), True)
    for thread in threading.enumerate():
        if type(thread).__module__.startswith("tensorboard."):
            thread.join(timeout=60)
    assert thread_errors == []  # the writer thread's own failure printed no second traceback


def test_a_full_disk_when_an_epoch_is_recorded_is_a_user_error(tmp_path, monkeypatch):
    log = MetricsLog(str(tmp_path), True)
    monkeypatch.setattr(monitor, "open", disk_full, raising=False)
    # Before the first checkpoint the line promises none.
    with pytest.raises(UserError, match="No space left on device.*; no checkpoint of this run was written "
                                        "there yet: free disk space"):
        log.epoch(0, {"train_loss": 1.0})
    (tmp_path / run_folder.LAST).write_bytes(b"a checkpoint")
    with pytest.raises(UserError, match="No space left on device.*last checkpoint there is intact: free disk space"):
        log.epoch(0, {"train_loss": 1.0})
    log.close()


def test_non_finite_weights_are_left_out_of_the_histograms(tmp_path, monkeypatch):
    # One optimizer step at a huge rate in a one-iteration epoch makes weights non-finite, which
    # TensorBoard failed on ("The histogram is empty").
    model = reactnet(NUM_CLASSES)
    layers = binary_convs(model)[:4]  # the first few layers keep the test fast
    monkeypatch.setattr(monitor, "binary_convs", lambda _: layers)
    with torch.no_grad():
        model.feature[1].binary_3x3.weight.fill_(float("nan"))
        model.feature[2].binary_3x3.weight[0].fill_(float("inf"))
    log = MetricsLog(str(tmp_path), True)
    log.epoch(0, {"train_loss": float("nan")}, model)
    log.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()["histograms"]
    assert "latent_weights/feature.1.binary_3x3" not in tags and "cam/feature.1.binary_3x3" not in tags
    partial = events.Histograms("latent_weights/feature.2.binary_3x3")[0].histogram_value
    assert partial.num == model.feature[2].binary_3x3.weight[1:].numel()
    assert "latent_weights/feature.1.binary_pw_down1" in tags


def ablation_folder(tmp_path, runs):
    """An ablation OUT folder whose run folders hold the given checkpoint and metrics files."""
    data = tmp_path / "data"
    data.mkdir()
    for name, files in runs.items():
        folder = tmp_path / "out" / "runs" / name
        folder.mkdir(parents=True)
        for file, content in files.items():
            if file.endswith(".tar"):
                torch.save(content, folder / file)
            else:
                (folder / file).write_text(content)
    return ["--data", data, "--out", tmp_path / "out", "--epochs", 1, "--only", CONFIG.name]


CONFIG = ablation.CONFIGS[0]


@pytest.mark.parametrize("content, held", [([1, 2], "a list"), ({"epoch": "3"}, "an epoch '3'")])
def test_ablation_refuses_a_checkpoint_that_is_not_a_training_one(tmp_path, capsys, content, held):
    argv = ablation_folder(tmp_path, {CONFIG.step1_name: {"checkpoint.pth.tar": content}})
    line = main_error_line(ablation.main, argv, capsys)
    assert line.startswith(f"error: {tmp_path}/out/runs/{CONFIG.step1_name}/checkpoint.pth.tar holds {held}, ")


def test_ablation_names_a_cut_metrics_line(tmp_path, capsys):
    record = json.dumps({"epoch": 0, "val_top1": 40.0})
    done = {"checkpoint.pth.tar": {"epoch": 1}}
    argv = ablation_folder(tmp_path, {CONFIG.step1_name: done,
                                      CONFIG.name: {**done, "metrics.jsonl": record + "\n" + record[:9]}})
    line = main_error_line(ablation.main, argv, capsys)
    assert line.startswith(f"error: line 2 of {tmp_path}/out/runs/{CONFIG.name}/metrics.jsonl is not a whole")


@pytest.mark.parametrize("variable, value, message", [
    ("SEED", "", "SEED is set but empty"),
    ("NGPUS", "abc", "NGPUS=abc is not a whole number"),
    ("LOG", None, "is a folder"),
])
def test_run_sh_refuses_a_bad_variable_before_starting(tmp_path, variable, value, message):
    env = {"DATA": str(tmp_path), "SAVE": str(tmp_path / "run"), variable: str(tmp_path) if value is None else value}
    result = run_sh(1, env, cwd=str(tmp_path))
    assert result.returncode == 2
    assert message in single_error_line(result)
    assert not os.path.exists(tmp_path / "run")  # stopped before train.py ran



def sliver_png(width, height=1):
    """A PNG of ``width`` x ``height`` black pixels: a few hundred bytes at most."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_whose_validation_resize_would_fill_the_memory_is_unreadable(tmp_path, backend):
    # At 224 px the shorter side goes to 256: 20000x1 pixels would become 5120000x256 (3.9 GB).
    root = one_class_folder(tmp_path, {"sliver.png": sliver_png(20000), "photo.JPEG": jpeg_bytes()})
    assert len(sliver_png(20000)) < 150
    items = read_all(SeededImageFolder(root, RunSpec(image_size=224), backend))
    assert not isinstance(items["photo.JPEG"], UnreadableImage)
    assert items["sliver.png"].reason == ("DecompressionBombError: 20000x1 pixels, of which the validation resize at "
                                          "224 px would make 1310720000 pixels, more than the 89478485 allowed")
    # A panorama of ordinary proportions is read.
    root = one_class_folder(tmp_path / "panorama", {"wide.png": sliver_png(2000, 100)})
    assert not isinstance(SeededImageFolder(root, RunSpec(image_size=224), backend)[0, 0], UnreadableImage)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_bound_covers_the_training_crops_resize(tmp_path, backend, monkeypatch):
    root = one_class_folder(tmp_path, {"photo.JPEG": jpeg_bytes(40, 36)})
    dataset = SeededImageFolder(root, RunSpec(image_size=32), backend, train=True)
    box = dataset[0, 7].augmentation.box  # the crop drawn for seed 7
    monkeypatch.setattr(pipeline, "MAX_RESIZED_PIXELS", 32 * max(32, box[2], box[3]))
    assert not isinstance(dataset[0, 7], UnreadableImage)
    monkeypatch.setattr(pipeline, "MAX_RESIZED_PIXELS", 32 * max(32, box[2], box[3]) - 1)
    assert "the training crop's resize at 32 px would make" in dataset[0, 7].reason


@pytest.fixture(scope="module")
def sliver_data(tiny_data, tmp_path_factory):
    """tiny_data with a 100000x1 PNG among the validation images: at 32 px its resize would make
    3700000x37 pixels, more than the bound."""
    root = tmp_path_factory.mktemp("sliver") / "data"
    shutil.copytree(tiny_data, root)
    (root / "val" / "class_1" / "sliver.png").write_bytes(sliver_png(100000))
    return str(root)


@pytest.mark.slow
def test_training_and_evaluate_count_and_name_an_image_whose_resize_is_too_large(sliver_data, teacher_weights,
                                                                                tmp_path):
    sliver = os.path.join(sliver_data, "val", "class_1", "sliver.png")
    trained = succeeded(run_script("step1/train.py", *train_args(sliver_data, teacher_weights, tmp_path)))
    assert f"warning: skipped unreadable image {sliver} (DecompressionBombError: 100000x1 pixels" in trained.stdout
    assert " * 1 unreadable of 13 validation images excluded from these accuracies" in trained.stdout
    for backend in BACKENDS:
        result = succeeded(run_script("evaluate.py", "--data", sliver_data, "--checkpoint",
                                      tmp_path / "checkpoint.pth.tar", "--data_backend", backend, "-j", 2,
                                      "--device", "cpu"))
        assert f"warning: skipped unreadable image {sliver} (DecompressionBombError" in result.stdout
        assert " * 1 unreadable of 13 validation images excluded from these accuracies" in result.stdout
