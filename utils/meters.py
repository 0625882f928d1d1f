"""Running averages and the progress lines, in the format the published code prints."""
import datetime
import time

import torch


class AverageMeter:
    """Tracks the latest value and the sample-weighted average, e.g. ``Loss 1.2e+00 (1.4e+00)``."""

    def __init__(self, name, fmt=":f"):
        self.name, self.fmt = name, fmt
        self.val = self.avg = self.sum = self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count

    def restore(self, total, count):
        """Continues from a saved ``sum`` and ``count``, as if their updates had happened here."""
        self.sum, self.count = total, count
        self.avg = total / count if count else 0

    def __str__(self):
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


class Meters:
    """AverageMeters by name, printed in the order given.

    ``Meters(loss=("Loss", ":.4e"), top1=("Acc@1", ":6.2f"))`` prints ``Loss ... Acc@1 ...``;
    ``meters["loss"].update(value, n)``; ``meters.averages("loss", "top1")`` gives a dict.
    """

    def __init__(self, **labels):
        self.meters = {name: AverageMeter(label, fmt) for name, (label, fmt) in labels.items()}

    def __getitem__(self, name):
        return self.meters[name]

    def __iter__(self):
        return iter(self.meters.values())

    def averages(self, *names):
        return {name: self.meters[name].avg for name in names}


class Totals:
    """Named float64 sums kept in one tensor on the device, so a distributed run adds them over
    processes in one all-reduce and a batch's values reach the host in one transfer."""

    def __init__(self, names, device):
        self.names = tuple(names)
        self.tensor = torch.zeros(len(self.names), dtype=torch.float64, device=device)

    def add(self, name, value):
        """Adds a host number to one sum, without a device synchronisation."""
        self.tensor[self.names.index(name)] += value

    def add_batch(self, **values):
        """Adds one value (tensor or number) per name given; returns them as host floats by name."""
        device = self.tensor.device
        named = [n for n in self.names if n in values]
        batch = torch.stack([torch.as_tensor(values[n], device=device).double() for n in named])
        self.tensor[[self.names.index(n) for n in named]] += batch
        return dict(zip(named, batch.tolist()))

    def as_dict(self):
        return dict(zip(self.names, self.tensor.tolist()))


class ProgressMeter:
    """``Epoch: [3][ 120/5005]\\tTime ...\\tLoss ...`` with an ETA for the rest of the loop."""

    def __init__(self, num_batches, meters, prefix=""):
        digits = len(str(num_batches))
        self.batch_fmt = "[{:" + str(digits) + "d}/" + str(num_batches) + "]"
        self.num_batches, self.meters, self.prefix = num_batches, meters, prefix
        self.started, self.first_batch = time.time(), None

    def line(self, batch):
        if self.first_batch is None:
            self.first_batch = batch
        entries = [self.prefix + self.batch_fmt.format(batch)] + [str(m) for m in self.meters]
        done = batch + 1 - self.first_batch
        remaining = (time.time() - self.started) / done * (self.num_batches - batch - 1)
        entries.append(f"ETA {datetime.timedelta(seconds=round(remaining))}")
        return "\t".join(entries)


def topk_correct(logits, target, ks=(1, 5)):
    """Number of samples whose target is among the top-k logits, for each k (k capped at classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == target[:, None]
    return [hits[:, :min(k, logits.shape[1])].any(dim=1).sum() for k in ks]
