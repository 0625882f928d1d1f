"""Runs the AdamBNN paper's ablation grid (its Table 1) on one dataset and tabulates the results.

The grid: Adam vs SGD (two-step, weight decay 5e-6 in step 1 then 0), step-1 weight decay
1e-5 / 5e-6 / 0 before a step 2 without weight decay, and one-step training (step 2 from scratch
for the same total number of epochs) with the same three weight decays. Every training run is a
subprocess of step1/train.py or step2/train.py with its own folder OUT/runs/<name>; two-step
configurations that start from the same step 1 share that run. Runs that already hold all their
epochs are skipped and stopped ones resume, so running the same command again continues the grid.
The table goes to OUT/ablation.md and is printed, with the paper's accuracy beside ours where the
paper gives one. The paper ran the grid on a ResNet-18 BNN: ``--arch reactnet_18`` trains that
network (default: ReActNet-A).

    python -m tools.ablation --arch reactnet_18 --data DATA --out ablation --epochs 4 \\
        --teacher resnet18 --teacher_weights teacher.pth -- --device cpu
"""
import argparse
import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

import torch  # noqa: E402

from models.registry import get_architecture  # noqa: E402
from models.spec import resolve  # noqa: E402
from utils.cli import OneLineErrorParser, add_spec_flags, given_spec, require_count, require_positive  # noqa: E402
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.recipe import ADAMBNN  # noqa: E402
from utils.run_folder import LAST  # noqa: E402
from utils.training_flags import REPO_ROOT  # noqa: E402

def decay_text(weight_decay):
    """``5e-06`` -> ``5e-6``: short enough for folder names and table cells."""
    return f"{weight_decay:g}".replace("e-0", "e-")


@dataclass(frozen=True)
class GridRow:
    """One row of the paper's ablation.

    Attributes:
        optimizer: ``adam`` or ``sgd`` (each with the train scripts' default learning rate
            unless the tool is given another).
        step1_weight_decay: weight decay of step 1, or None for one-step training.
        step2_weight_decay: weight decay of step 2 (of the only step, for one-step training).
    """
    optimizer: str
    step1_weight_decay: float | None
    step2_weight_decay: float

    @property
    def two_step(self):
        return self.step1_weight_decay is not None

    @property
    def schedule(self):
        return "two-step" if self.two_step else "one-step"

    @property
    def weight_decays(self):
        if not self.two_step:
            return decay_text(self.step2_weight_decay)
        return f"{decay_text(self.step1_weight_decay)} -> {decay_text(self.step2_weight_decay)}"

    @property
    def name(self):
        decays = self.weight_decays.replace(" -> ", "_")
        return f"{self.optimizer}_{self.schedule.replace('-', '')}_wd{decays}"

    @property
    def step1_name(self):
        return f"step1_{self.optimizer}_wd{decay_text(self.step1_weight_decay)}"


# Table 1 of the paper (one-step and two-step at three weight decays) plus its Adam vs SGD pair.
OPTIMIZERS = tuple(ADAMBNN.learning_rates)
# The RunSpec flags passed to every train script when given (the others follow the architecture).
FORWARDED_SPEC_FLAGS = ("arch", "image_size")
CONFIGS = [
    GridRow("adam", 1e-5, 0.0),
    GridRow("adam", 5e-6, 0.0),
    GridRow("adam", 0.0, 0.0),
    GridRow("adam", None, 1e-5),
    GridRow("adam", None, 5e-6),
    GridRow("adam", None, 0.0),
    GridRow("sgd", 5e-6, 0.0),
]


# ImageNet top-1 (%) of the paper's ResNet-18 BNN, as reported (AdamBNN, ICML 2021; see
# /README.md): the best two-step configuration and its SGD counterpart. Cells missing here are
# printed as n/a.
PAPER_TOP1 = {"adam_twostep_wd5e-6_0": 63.23, "sgd_twostep_wd5e-6_0": 61.25}


@dataclass(frozen=True)
class Run:
    """One call of a train script; ``flags`` exclude those shared by every run."""
    name: str
    script: str
    epochs: int
    flags: tuple


def plan(configs, epochs, runs_dir, learning_rates=None):
    """The training runs behind ``configs`` in execution order, each step-1 run listed once.

    A two-step configuration trains step 1 and step 2 for ``epochs`` each, step 2 starting from
    step 1's best checkpoint; a one-step configuration trains step 2 from scratch for
    ``2 * epochs``, so both see the same number of epochs in all. ``learning_rates`` maps an
    optimizer name to the learning rate of its runs; optimizers it leaves out keep the train
    scripts' default.
    """
    learning_rates = learning_rates or {}
    runs = {}
    for config in configs:
        optimizer = ("--optimizer", config.optimizer)
        if config.optimizer in learning_rates:
            optimizer += ("--learning_rate", str(learning_rates[config.optimizer]))
        if config.two_step:
            runs.setdefault(config.step1_name, Run(
                config.step1_name, "step1/train.py", epochs,
                optimizer + ("--weight_decay", str(config.step1_weight_decay))))
            start = os.path.join(runs_dir, config.step1_name, "model_best.pth.tar")
        else:
            start = "none"
        runs[config.name] = Run(
            config.name, "step2/train.py", epochs if config.two_step else 2 * epochs,
            optimizer + ("--weight_decay", str(config.step2_weight_decay), "--step1_checkpoint", start))
    return list(runs.values())


def completed_epochs(folder):
    """Epochs finished in ``folder`` according to its last checkpoint (0 when there is none).

    The checkpoint is memory-mapped, so only its small entries are read. One that cannot be read
    counts as unfinished: the train script then explains what is wrong with it. One that reads
    but holds no whole number of epochs is not a training checkpoint, and is refused here.
    """
    path = os.path.join(folder, LAST)
    if not os.path.isfile(path):
        return 0
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return 0
    epoch = checkpoint.get("epoch", 0) if isinstance(checkpoint, dict) else None
    if type(epoch) is not int:
        held = (f"an epoch {epoch!r}" if isinstance(checkpoint, dict)
                else f"a {type(checkpoint).__name__}")
        raise UserError(f"{path} holds {held}, not a training checkpoint: move it away to train "
                        f"{os.path.basename(folder)} again, or pass another --out")
    return epoch


def train(run, runs_dir, shared_flags):
    """Runs one train script to completion, unless its folder already holds all its epochs."""
    folder = os.path.join(runs_dir, run.name)
    if completed_epochs(folder) >= run.epochs:
        print(f"=> {run.name}: all {run.epochs} epochs already done", flush=True)
        return
    command = [sys.executable, os.path.join(REPO_ROOT, run.script), *shared_flags,
               "--epochs", str(run.epochs), "--save", folder, *run.flags]
    print(f"=> {run.name}: training ({' '.join(command[1:])}); progress in {folder}/log.txt",
          flush=True)
    # Progress lines are already in log.txt; errors and warnings still reach the terminal.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        status = process.wait()
    except KeyboardInterrupt:
        # The train script got the same Ctrl-C and is writing a resumable checkpoint: let it finish.
        status = process.wait()
    if status:
        raise UserError(f"{run.name} stopped with exit status {status} (see {folder}/log.txt); "
                        f"run the same command to continue")


def read_metrics(folder):
    """The records of ``folder/metrics.jsonl`` in epoch order, one per epoch.

    An epoch that was interrupted after its record was written is trained again on resume and
    logged twice; the later record is the one the checkpoint kept.
    """
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    by_epoch = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                record = parse_record(line)
                if record is None:
                    raise UserError(f"line {number} of {path} is not a whole epoch record (the file "
                                    f"was cut short or edited): delete that line, then run the same "
                                    f"command")
                by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def parse_record(line):
    """The epoch record on one line of metrics.jsonl, or None if the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or type(record.get("epoch")) is not int or "val_top1" not in record:
        return None
    return record


def percent(share):
    return None if share is None else 100 * share


def summarize(records):
    """Table values of one run from its metrics records; None where a value was not measured."""
    last = records[-1]
    # The paper reports the first binary layer; the layers are logged in forward order.
    per_layer = list((last.get("saturation_per_layer") or {}).values())
    flip_flops = [r["flip_flop"] for r in records if r.get("flip_flop") is not None]
    return {
        "epochs": len(records),
        "final_top1": last["val_top1"],
        "best_top1": max(r["val_top1"] for r in records),
        "mean_flip_flop": sum(flip_flops) / len(flip_flops) if flip_flops else None,
        "c2i": last.get("c2i"),
        "saturation": percent(last.get("saturation")),
        "saturation_first": percent(per_layer[0] if per_layer else None),
    }


COLUMNS = ["configuration", "optimizer", "schedule", "weight decay", "epochs (final step)",
           "final acc@1 (%)", "best acc@1 (%)", "paper acc@1 (%, reported)", "mean flip-flop",
           "final C2I", "saturation (%)", "saturation, first binary layer (%)"]


def cell(value, form):
    return "n/a" if value is None else format(value, form)


def table(configs, runs_dir):
    """Markdown table, one row per configuration whose final run has at least one epoch logged."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for config in configs:
        records = read_metrics(os.path.join(runs_dir, config.name))
        if not records:
            continue
        s = summarize(records)
        row = [config.name, config.optimizer, config.schedule, config.weight_decays, str(s["epochs"]),
               cell(s["final_top1"], ".2f"), cell(s["best_top1"], ".2f"),
               cell(PAPER_TOP1.get(config.name), ".2f"), cell(s["mean_flip_flop"], ".3e"), cell(s["c2i"], ".4f"),
               cell(s["saturation"], ".1f"), cell(s["saturation_first"], ".1f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


NOTES = """
Measured here: every column but the paper's. The paper's column is the ImageNet top-1 of its
ResNet-18 BNN as the AdamBNN paper reports it (n/a where this repository does not record the cell).
All measured numbers are of each configuration's final step (step 2; the only step for one-step runs).
Accuracy is validation acc@1; the flip-flop ratio is averaged over the step's epochs; C2I is the
sign correlation between the final latent weights and those at the start of the step (for
two-step runs: the step-1 weights); saturation is the share of pre-binarization activations with
|x| > 1, on the first batches of the last epoch.
"""


def write_report(configs, runs_dir, path, source):
    """Writes the table and its notes to ``path`` under a heading naming ``source`` (what was trained
    on which data); returns the heading and the table."""
    text = f"# AdamBNN ablation: {source}\n\n" + table(configs, runs_dir)
    with open(path, "w") as f:
        f.write(text + NOTES)
    return text


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
    parser.add_argument("--out", required=True,
                        help="folder for the runs (OUT/runs/<name>) and the table (OUT/ablation.md)")
    parser.add_argument("--epochs", type=int, default=ADAMBNN.epochs,
                        help=f"epochs per step; one-step runs train twice as many (default {ADAMBNN.epochs})")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[c.name for c in CONFIGS],
                        help=f"train only these configurations: {', '.join(c.name for c in CONFIGS)}")
    for optimizer in OPTIMIZERS:
        parser.add_argument(f"--{optimizer}_learning_rate", type=float,
                            help=f"learning rate of the {optimizer.upper()} runs (default: the train "
                                 f"scripts' {optimizer} default, meant for batch 256)")
    forwarded = parser.add_argument_group("passed to every train script when given")
    forwarded.add_argument("--teacher", help="torchvision model name of the teacher")
    forwarded.add_argument("--teacher_weights", help="state_dict file of the teacher")
    forwarded.add_argument("--batch_size", type=int, help="global batch of every run")
    forwarded.add_argument("-j", "--workers", type=int, help="loader workers per run")
    parser.add_argument("extra", nargs="*",
                        help="after '--': more flags for every train script, e.g. -- --device cpu")
    add_spec_flags(parser, FORWARDED_SPEC_FLAGS, source=None)
    return parser


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    learning_rates = {name: getattr(args, f"{name}_learning_rate") for name in OPTIMIZERS
                      if getattr(args, f"{name}_learning_rate") is not None}
    require_positive({"--epochs": args.epochs,
                      **{f"--{name}_learning_rate": value for name, value in learning_rates.items()}})
    require_count({f"--{name}": getattr(args, name) for name in ("epochs", "batch_size", "workers")
                   if getattr(args, name) is not None})
    if not os.path.isdir(args.data):
        raise UserError(f"data folder {args.data} does not exist: --data must hold train/ and val/")
    runs_dir = os.path.join(os.path.abspath(args.out), "runs")
    try:
        os.makedirs(runs_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {runs_dir} ({e.strerror}): pass a writable --out") from None

    architecture = get_architecture(resolve(given_spec(args))[0].arch)
    shared_flags = ["--data", args.data]
    for flag in ("teacher", "teacher_weights", "batch_size", "workers", *FORWARDED_SPEC_FLAGS):
        value = getattr(args, flag)
        if value is not None:
            shared_flags += [f"--{flag}", str(value)]
    shared_flags += args.extra

    selected = [c for c in CONFIGS if args.only is None or c.name in args.only]
    for run in plan(selected, args.epochs, runs_dir, learning_rates):
        train(run, runs_dir, shared_flags)
    source = f"{architecture.title} trained on {os.path.abspath(args.data)}, {args.epochs} epochs per step"
    print(write_report(CONFIGS, runs_dir, os.path.join(args.out, "ablation.md"), source), end="", flush=True)


if __name__ == "__main__":
    main()
