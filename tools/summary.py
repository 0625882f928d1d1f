"""Prints the per-layer cost of a network and its BOPs, FLOPs, OPs, parameters and size.

Run from the repository root:

    python -m tools.summary                                  # step-2 ReActNet-A, 1000 classes, 224 px
    python -m tools.summary --step 1                         # binary activations, real weights
    python -m tools.summary --arch reactnet_18               # another registered architecture
    python -m tools.summary --checkpoint step2/models/model_best.pth.tar

With --checkpoint, the network and the image size are those the checkpoint records (its RunSpec;
ReActNet-A, step 2 and 224 px for released files) and the number of classes that of its fc layer;
the weights are loaded strictly, so a file that does not fit is reported. Without, they are the
flags', else the architecture's defaults. The counts themselves depend only on the architecture and
the image size. At 224x224 the architecture's figures as its paper reports them are printed below
ours.
"""
import argparse

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

from models import build_model  # noqa: E402
from models.checkpoint import title_of  # noqa: E402
from models.ops import BOPS_PER_OP, count_ops  # noqa: E402
from models.registry import get_architecture  # noqa: E402
from models.spec import resolve  # noqa: E402
from utils.cli import (OneLineErrorParser, add_spec_flags, given_spec, model_for, require_positive,  # noqa: E402
                       require_spec)
from utils.errors import report_user_errors  # noqa: E402

COLUMNS = ("layer", "kind", "input", "output", "MACs", "params")
# The input size at which papers report a network's cost.
REPORTED_SIZE = 224


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (ours or released)")
    add_spec_flags(parser, ("arch", "step", "num_classes", "image_size"), "with --checkpoint, the checkpoint's")
    return parser


def network(args):
    """The network the flags describe, with the checkpoint's weights when one is given;
    ``model.spec`` is its RunSpec."""
    if args.num_classes is not None:
        require_positive({"--num_classes": args.num_classes})
    if args.checkpoint:
        return model_for(args)
    spec = resolve(given_spec(args))[0]
    require_spec(spec)
    return build_model(spec)


def format_table(layers):
    """The per-layer rows as aligned text, one line per layer under a header."""
    cells = [COLUMNS] + [(row["name"], row["kind"], format_shape(row["input_shape"]),
                          format_shape(row["output_shape"]), f"{row['macs']:,}", f"{row['params']:,}")
                         for row in layers]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    # Names and kinds read best left-aligned, shapes and numbers right-aligned.
    aligned = [[cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
               for line in cells]
    return "\n".join("  ".join(line) for line in aligned)


def format_shape(shape):
    return "x".join(str(d) for d in shape)


def format_totals(counts):
    """BOPs, FLOPs, OPs, parameters and size, one per line."""
    return "\n".join([
        f"BOPs:   {counts['bops']:>15,}  ({counts['bops']:.3e})",
        f"FLOPs:  {counts['flops']:>15,}  ({counts['flops']:.3e})",
        f"OPs:    {round(counts['ops']):>15,}  ({counts['ops']:.3e}) = BOPs / {BOPS_PER_OP} + FLOPs",
        f"params: {counts['params']:>15,}  ({counts['params_binary']:,} binary + "
        f"{counts['params_real']:,} real)",
        f"size:   {counts['size_mb']:>15.2f}  MB (binary weights at 1 bit, other parameters in "
        f"fp32; 1 MB = 10^6 bytes)",
    ])


def format_reported(architecture):
    """The paper's BOPs, FLOPs and OPs of ``architecture`` at REPORTED_SIZE, labelled as reported."""
    costs = architecture.reported_costs
    return (f"paper:  BOPs {costs['bops']:.3g}, FLOPs {costs['flops']:.3g}, OPs {costs['ops']:.3g} "
            f"at {REPORTED_SIZE}x{REPORTED_SIZE} (reported by {costs['source']})")


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    model = network(args)
    spec = model.spec
    counts = count_ops(model, spec.image_size)
    print(f"{title_of(model)}, step {spec.step} ({'binary' if spec.binary_weights else 'real'} weights), "
          f"{spec.num_classes} classes, {spec.image_size}x{spec.image_size} input")
    print(format_table(counts["layers"]))
    print(format_totals(counts))
    architecture = get_architecture(spec.arch)
    if spec.image_size == REPORTED_SIZE and spec.binary_weights and architecture.reported_costs:
        print(format_reported(architecture))
    return counts


if __name__ == "__main__":
    main()
