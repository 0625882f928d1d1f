"""Running averages and the progress lines, in the format the published code prints."""
import datetime
import time



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
