"""The ways the benchmark runs a training iteration, by name: ``baseline``, ``ours`` and
``ours+FLAG+...``."""
import dataclasses

SPEED_FLAGS = ("bf16", "channels_last", "fused_adam", "compile")
# Not speed flags: the paper's per-iteration flip-flop bookkeeping, on in training by default, and
# --deterministic, whose cost is measured.
FLAGS = (*SPEED_FLAGS, "metrics", "deterministic")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of running the training iteration."""

    published: bool = False
    bf16: bool = False
    channels_last: bool = False
    fused_adam: bool = False
    compile: bool = False
    metrics: bool = False
    deterministic: bool = False

    @property
    def name(self):
        if self.published:
            return "baseline"
        return "+".join(["ours"] + [flag for flag in FLAGS if getattr(self, flag)])

    def with_flags(self, flags):
        return dataclasses.replace(self, **{flag: True for flag in flags})


def parse_variant(text):
    """``baseline``, ``ours`` or ``ours+FLAG+...`` (FLAG from FLAGS) as a Variant."""
    if text == "baseline":
        return Variant(published=True)
    head, *flags = text.split("+")
    unknown = [flag for flag in flags if flag not in FLAGS]
    if head != "ours" or unknown:
        raise ValueError(f"unknown configuration '{text}': use baseline, fastest, ours or "
                         f"ours+FLAG[+FLAG...] with FLAG among {', '.join(FLAGS)}")
    return Variant().with_flags(flags)
