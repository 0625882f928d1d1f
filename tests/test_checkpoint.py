"""models.load_checkpoint on every supported file layout and on bad files.

Released files: a dict with ``epoch``, ``state_dict``, ``best_top1_acc`` and ``optimizer``, saved from
an nn.DataParallel model (every key prefixed ``module.``); ReActNet's release stores binary conv
weights as ``*.weights`` of shape (out*in*k*k, 1).
"""
import math
import os
import re

import pytest
import torch
import torchvision

from models import CheckpointError, load_checkpoint, reactnet
from utils.trainer import Trainer
from utils.training_flags import build_parser

from conftest import train_args
from test_model import read_tsv, ref_forward


RELEASED_CLASSES = 1000


class CreatesMarkerWhenUnpickled:
    """Unpickling this runs ``os.mkdir(marker)``: the kind of payload weights_only must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def perturb(model, seed):
    """Moves every weight and statistic away from its initial value, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


def outputs(model):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(x)


def published_wrapper(state_dict):
    """What the authors' torch.save of an nn.DataParallel model held."""
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.25e-3)
    return {"epoch": 256, "state_dict": {"module." + k: v for k, v in state_dict.items()},
            "best_top1_acc": 70.5, "optimizer": optimizer.state_dict()}


def flatten_binary_weights(state_dict):
    """ReActNet's release: ``binary_*.weights`` of shape (out*in*k*k, 1)."""
    return {(k + "s" if ".binary_" in k else k): (v.reshape(-1, 1) if ".binary_" in k else v)
            for k, v in state_dict.items()}


def save(obj, folder, name):
    path = os.path.join(folder, name)
    torch.save(obj, path)
    return path


def refusal(path, model=None):
    model = model or reactnet(num_classes=3)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(model, path)
    return str(info.value)


def mentions_key(message, key):
    """``key`` appears as a whole key, not as the tail of a longer one."""
    return re.search(r"(?<![\w.])" + re.escape(key) + r"(?![\w.])", message) is not None


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def released_tensors():
    """Contents of a released ReActNet-A: a tensor for every entry of the published state_dict
    (tests/reactnet_a_state_dict.tsv, 1000 classes), drawn here without any model of this
    repository, with values that move every layer away from the defaults."""
    g = torch.Generator().manual_seed(1)

    def uniform(shape, low, high):
        return torch.rand(shape, generator=g) * (high - low) + low

    tensors = {}
    for name, shape, dtype in read_tsv():
        if dtype != torch.float32:
            tensors[name] = torch.tensor(1000, dtype=dtype).reshape(shape)  # num_batches_tracked
        elif name.endswith("running_var"):
            tensors[name] = uniform(shape, 0.3, 0.8)
        elif ".bn" in name and name.endswith(".weight"):
            tensors[name] = uniform(shape, 0.5, 1.5)
        elif ".prelu" in name:
            tensors[name] = uniform(shape, -0.2, 0.6)
        elif len(shape) == 4 and ".move" not in name:
            bound = 1 / math.sqrt(math.prod(shape[1:]))
            tensors[name] = uniform(shape, -bound, bound)
        elif name == "fc.weight":
            tensors[name] = uniform(shape, -1 / 32, 1 / 32)
        else:  # learnable shifts, BatchNorm shifts and means, fc.bias
            tensors[name] = uniform(shape, -0.2, 0.2)
    return tensors


def reference_logits(path):
    """Logits of the file's raw tensors through the functional ReActNet-A of test_model.py, in
    eval mode with binary weights; the file is read here and its keys mapped by hand."""
    raw = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    shapes = {name: shape for name, shape, _ in read_tsv()}
    params = {}
    for key, value in raw.items():
        name = key.removeprefix("module.")
        if name.endswith(".weights"):  # ReActNet's flat (out*in*k*k, 1) binary weights
            name = name[:-1]
            value = value.reshape(shapes[name])
        params[name] = value.double()
    assert params.keys() == shapes.keys()
    with torch.no_grad():
        return ref_forward(reference_input(), params, training=False, binary_weights=True)


def reference_input():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def loaded_logits(path):
    """Logits of a step-2 ReActNet-A that models.load_checkpoint filled from ``path``."""
    model = reactnet(RELEASED_CLASSES, binary_weights=True)
    checkpoint = load_checkpoint(model, path)
    with torch.no_grad():
        return model.double().eval()(reference_input()), checkpoint


def assert_same_logits(actual, expected):
    # The model computes alpha in float32 even for float64 weights; the reference does not.
    atol = 1e-5 * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=atol)


@pytest.fixture(scope="module")
def engine_run(tiny_data, teacher_weights, tmp_path_factory):
    """A checkpoint written by the training engine itself, from a student with moved weights."""
    save_dir = str(tmp_path_factory.mktemp("engine_run"))
    flags = [str(a) for a in train_args(tiny_data, teacher_weights, save_dir)]
    trainer = Trainer(build_parser(1).parse_args(flags), step=1)
    perturb(trainer.student, seed=2)
    trainer.save(is_best=False)
    return trainer.student, os.path.join(save_dir, "checkpoint.pth.tar")


@pytest.fixture(scope="module")
def small_state_dict():
    torch.manual_seed(0)
    return perturb(reactnet(num_classes=3), seed=3).state_dict()


def test_engine_checkpoint_loads_and_reproduces_outputs(engine_run):
    student, path = engine_run
    model = reactnet(num_classes=3)
    checkpoint = load_checkpoint(model, path)
    assert checkpoint["step"] == 1 and checkpoint["epoch"] == 0
    assert torch.equal(outputs(model), outputs(student))


def test_adambnn_release_layout_loads(released_tensors, folder):
    path = save(published_wrapper(released_tensors), folder, "adambnn.pth.tar")
    logits, checkpoint = loaded_logits(path)
    assert checkpoint["best_top1_acc"] == 70.5 and checkpoint["epoch"] == 256
    assert_same_logits(logits, reference_logits(path))


def test_reactnet_release_layout_with_flat_weights_loads(released_tensors, folder):
    flat = flatten_binary_weights(released_tensors)
    assert "feature.1.binary_3x3.weights" in flat and flat["feature.1.binary_3x3.weights"].shape == (9216, 1)
    path = save(published_wrapper(flat), folder, "reactnet.pth.tar")
    logits, _ = loaded_logits(path)
    assert_same_logits(logits, reference_logits(path))


def test_reference_sees_a_wrong_reshape_of_flat_weights(released_tensors, folder):
    # Guards the guard: the same file with one flat tensor laid out (out, k, k, in) instead.
    flat = flatten_binary_weights(released_tensors)
    right = save(published_wrapper(flat), folder, "reactnet_right.pth.tar")
    key = "feature.5.binary_3x3.weights"
    flat[key] = released_tensors[key[:-1]].permute(0, 2, 3, 1).reshape(-1, 1)
    permuted = save(published_wrapper(flat), folder, "reactnet_permuted.pth.tar")
    logits, _ = loaded_logits(permuted)
    with pytest.raises(AssertionError):
        assert_same_logits(logits, reference_logits(right))


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module._orig_mod."])
def test_bare_and_wrapped_state_dicts_load(small_state_dict, folder, prefix):
    path = save({prefix + k: v for k, v in small_state_dict.items()}, folder, f"bare{prefix}.pth")
    model = reactnet(num_classes=3)
    load_checkpoint(model, path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in small_state_dict.items())


@pytest.fixture(scope="module")
def misfit_path(small_state_dict, folder):
    broken = dict(small_state_dict)
    del broken["feature.7.move21.bias"]
    broken["feature.7.extra.weight"] = torch.zeros(3)
    broken["fc.weight"] = torch.zeros(4, 1024)
    return save({"state_dict": broken}, folder, "misfit.pth")


def test_misfit_names_missing_unexpected_and_misshaped_keys(misfit_path):
    message = refusal(misfit_path)
    for word, key in [("missing", "feature.7.move21.bias"), ("unexpected", "feature.7.extra.weight"),
                      ("mis-shaped", "fc.weight")]:
        assert word in message and mentions_key(message, key), (word, message)
    assert misfit_path in message


def test_refused_load_leaves_model_untouched(misfit_path):
    model = reactnet(num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    refusal(misfit_path, model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_flat_weights_of_wrong_size_are_refused(small_state_dict, folder):
    flat = flatten_binary_weights(small_state_dict)
    flat["feature.3.binary_pw.weights"] = torch.zeros(7, 1)
    message = refusal(save(flat, folder, "flat_wrong.pth"))
    assert mentions_key(message, "feature.3.binary_pw.weight")


def test_other_architecture_is_refused_naming_keys(folder):
    path = save(torchvision.models.resnet18(num_classes=3).state_dict(), folder, "resnet18.pth")
    message = refusal(path)
    assert "missing" in message and mentions_key(message, "feature.0.conv1.weight")
    assert "unexpected" in message and mentions_key(message, "conv1.weight")


# torch.load's weights_only unpickler reads text as opcodes and fails with whatever the opcodes
# lead to: a KeyError for the first text, an IndexError for the second.
@pytest.mark.parametrize("content", [
    b"",
    b"hello world\n",
    b"step 1 finished, accuracy 70.1\n",
], ids=["empty", "text", "text_with_setitem_opcode"])
def test_non_checkpoint_files_are_refused(folder, content):
    path = os.path.join(folder, f"not_a_checkpoint_{len(content)}.pth")
    with open(path, "wb") as f:
        f.write(content)
    assert path in refusal(path)


@pytest.mark.parametrize("fraction", [0.5, 0.001])
def test_truncated_checkpoint_is_refused(engine_run, folder, fraction):
    _, path = engine_run
    with open(path, "rb") as f:
        data = f.read()
    truncated = os.path.join(folder, f"truncated_{fraction}.pth")
    with open(truncated, "wb") as f:
        f.write(data[:int(len(data) * fraction)])
    assert truncated in refusal(truncated)


def test_missing_file_is_refused(folder):
    path = os.path.join(folder, "never_written.pth")
    assert path in refusal(path)


def test_pickled_code_is_refused_and_not_run(small_state_dict, folder):
    marker = os.path.join(folder, "payload_ran")
    path = save({"state_dict": small_state_dict, "extra": CreatesMarkerWhenUnpickled(marker)},
                folder, "payload.pth")
    refusal(path)
    assert not os.path.exists(marker)
    # The payload is live: an unrestricted load does run it.
    torch.load(path, weights_only=False)
    assert os.path.isdir(marker)


def test_list_instead_of_dict_is_refused(small_state_dict, folder):
    path = save(list(small_state_dict.values()), folder, "list.pth")
    assert "list" in refusal(path)
