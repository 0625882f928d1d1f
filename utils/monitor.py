"""The AdamBNN paper's measurements, taken while training, and the TensorBoard log.

- Flip-flop ratio: the share of binary-conv latent weights whose sign changed in an optimizer
  step, ``sum |sign(w_t+1) - sign(w_t)| / 2 / count``, averaged over the epoch's iterations, overall
  and per layer. Each step compares sign bits (``w < 0``), so a weight of exactly 0 counts as
  positive rather than as the formula's half flip: cheaper than comparing ``sign()`` values (the
  cost measured in docs/analysis.md), and the same numbers in practice, since an optimizer step
  essentially never lands a weight on exactly 0.
- C2I: sign correlation between the current latent weights and those at the start of this step,
  ``1 - 2 * share of signs that differ``. (The paper's printed formula does not reproduce its
  printed values; this correlation does.)
- Activation saturation: the share of pre-binarization activations beyond the limit where the
  activation binarizer's surrogate gradient is zero (``|x| > 1``; BNext's ``bnext_sign``:
  ``|x| > 1.5``), per binary conv, on the first batches of each epoch.
  Read where the model's ``activation_inputs()`` says (ReActNet-A: its RSign shifts), else at the
  input of every BinaryActivation module.
- CAM: the channel-wise absolute mean of each binary conv's latent weights, as histograms, with
  histograms of the latent weights themselves.

Sign bookkeeping stays on the device and is read once per epoch, so the per-iteration cost is one
comparison over the binary weights and a count of the sign bits that changed.
"""
import contextlib
import json
import os
import threading

import torch

from models.layers import BinaryActivation, binary_convs

from .run_folder import last_checkpoint, write_failed


def sign_int8(weight):
    return torch.sign(weight.detach()).to(torch.int8)


class PaperMetrics:
    """Flip-flop ratio, C2I and saturation of one binary network, accumulated per epoch."""

    def __init__(self, model, initial_signs=None, saturation_batches=2):
        self.layers = binary_convs(model)
        self.initial_signs = initial_signs or {name: sign_int8(conv.weight) for name, conv in self.layers}
        self.saturation_batches = saturation_batches
        self.negative = None  # sign bits of the latent weights after the last optimizer step
        self.activation_inputs = activation_inputs(model)
        self.saturation_limit = saturation_limit(model)
        self.start_epoch()

    def start_epoch(self):
        device = self.layers[0][1].weight.device
        self.flips = torch.zeros(len(self.layers), dtype=torch.int64, device=device)
        self.steps = 0
        self.saturated = {name: [0.0, 0] for name, _ in self.activation_inputs}
        self.sampled_batches = 0
        # Validation does not move the weights, so the signs after the last step stay current.
        if self.negative is None:
            self.negative = self.negative_bits()

    def negative_bits(self):
        return [conv.weight.detach() < 0 for _, conv in self.layers]

    def after_step(self):
        """Counts the sign flips of the optimizer step that just ran."""
        negative = self.negative_bits()
        self.flips += torch.stack([torch.count_nonzero(new ^ old) for new, old in zip(negative, self.negative)])
        self.negative = negative
        self.steps += 1

    def sample_saturation(self):
        """A context manager that records saturation for this batch if it is among the first ones."""
        if self.sampled_batches >= self.saturation_batches:
            return _NoHooks()
        self.sampled_batches += 1
        return _SaturationHooks(self)

    def epoch_summary(self):
        """Per-epoch numbers: ``flip_flop``, ``c2i``, ``saturation`` (overall and per layer)."""
        counts = torch.tensor([conv.weight.numel() for _, conv in self.layers], dtype=torch.float64)
        flips = self.flips.cpu().double()
        steps = max(self.steps, 1)
        differing = torch.tensor([(sign_int8(conv.weight) != self.initial_signs[name]).sum().item()
                                  for name, conv in self.layers], dtype=torch.float64)
        saturation = {name: s / n for name, (s, n) in self.saturated.items() if n}
        total_saturated = sum(s for s, _ in self.saturated.values())
        total_seen = sum(n for _, n in self.saturated.values())
        return {
            "flip_flop": (flips.sum() / counts.sum() / steps).item(),
            "flip_flop_per_layer": {name: (flips[k] / counts[k] / steps).item()
                                    for k, (name, _) in enumerate(self.layers)},
            "c2i": (1 - 2 * differing.sum() / counts.sum()).item(),
            "c2i_per_layer": {name: (1 - 2 * differing[k] / counts[k]).item()
                              for k, (name, _) in enumerate(self.layers)},
            "saturation": total_saturated / total_seen if total_seen else None,
            "saturation_per_layer": saturation,
        }


def saturation_limit(model):
    """The ``|x|`` beyond which the activation binarizer of ``model`` passes no gradient."""
    binarizer = next(m.binarizer for m in model.modules() if isinstance(m, BinaryActivation))
    return getattr(binarizer, "saturates_beyond", 1.0)


def activation_inputs(model):
    """``(name, module)`` pairs where the activations about to be binarized are read: the output of
    the modules that the model's ``activation_inputs()`` names, else the input of each BinaryActivation."""
    if hasattr(model, "activation_inputs"):
        return model.activation_inputs()
    return [(name, module) for name, module in model.named_modules() if isinstance(module, BinaryActivation)]


class _NoHooks:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _SaturationHooks:
    def __init__(self, metrics):
        self.metrics, self.handles = metrics, []

    def record(self, name):
        def hook(module, inputs, output):
            values = inputs[0] if isinstance(module, BinaryActivation) else output
            counts = self.metrics.saturated[name]
            counts[0] += (values.detach().abs() > self.metrics.saturation_limit).sum().item()
            counts[1] += values.numel()
        return hook

    def __enter__(self):
        self.handles = [module.register_forward_hook(self.record(name))
                        for name, module in self.metrics.activation_inputs]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def channel_abs_mean(weight):
    """CAM: mean |w| of every output channel."""
    return weight.detach().abs().flatten(1).mean(dim=1)


def quiet_writer_thread(previous):
    """A ``threading.excepthook`` that passes on every exception but a failed write in
    TensorBoard's writer thread: the main thread raises the same error at its next write and
    reports it in one line, so the thread's traceback would only repeat it."""
    def hook(args):
        if not (isinstance(args.exc_value, OSError)
                and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)
    hook.quiets_writer_thread = True
    return hook


def finite_values(tensor):
    """The finite elements of ``tensor``, flattened: TensorBoard cannot bin NaN or infinity."""
    tensor = tensor.detach()
    return tensor[torch.isfinite(tensor)]


class MetricsLog:
    """TensorBoard events and ``metrics.jsonl`` in the run folder (main process only).

    A failed write (a full disk) raises a UserError; the checkpoint is written after the metrics,
    so the last one stays as it was.
    """

    def __init__(self, folder, enabled):
        self.writer = None
        self.folder = folder
        self.jsonl = os.path.join(folder, "metrics.jsonl")
        self.enabled = enabled
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            if not getattr(threading.excepthook, "quiets_writer_thread", False):
                threading.excepthook = quiet_writer_thread(threading.excepthook)
            with self.reporting_write_errors():
                self.writer = SummaryWriter(os.path.join(folder, "tensorboard"))

    @contextlib.contextmanager
    def reporting_write_errors(self):
        try:
            yield
        except OSError as e:
            raise write_failed(f"could not write the metrics in {self.folder}", self.folder, e,
                               last_checkpoint(self.folder)) from None

    def iteration(self, step, values):
        if self.writer:
            with self.reporting_write_errors():
                for key, value in values.items():
                    self.writer.add_scalar(f"train_iter/{key}", value, step)

    def epoch(self, epoch, record, model=None):
        if not self.enabled:
            return
        with self.reporting_write_errors():
            self.write_epoch(epoch, record, model)

    def write_epoch(self, epoch, record, model):
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(dict(epoch=epoch, **record)) + "\n")
        for key, value in record.items():
            if isinstance(value, dict):
                for name, v in value.items():
                    self.writer.add_scalar(f"{key}/{name}", v, epoch)
            elif value is not None:
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
        if model is not None:
            for name, conv in binary_convs(model):
                for tag, values in ((f"cam/{name}", channel_abs_mean(conv.weight)),
                                    (f"latent_weights/{name}", conv.weight)):
                    values = finite_values(values)
                    if values.numel():
                        self.writer.add_histogram(tag, values, epoch)
        self.writer.flush()

    def close(self):
        if self.writer:
            with self.reporting_write_errors():
                self.writer.close()
