"""Prints the per-layer cost of a network and its BOPs, FLOPs, OPs, parameters and size.

Run from the repository root:

    python -m tools.summary --image_size 224                 # step-2 network, 1000 classes
    python -m tools.summary --step 1                         # binary activations, real weights
    python -m tools.summary --arch reactnet_18               # another registered architecture
    python -m tools.summary --checkpoint step2/models/model_best.pth.tar

With --checkpoint, the architecture and the step come from the checkpoint's metadata (ReActNet-A and
step 2 for released files) and the number of classes from its fc layer; the weights are loaded strictly, so a file that does not fit
is reported. The counts themselves depend only on the architecture and the image size. At 224x224
the architecture's figures as its paper reports them are printed below ours.
"""
import argparse

from models import ModelSpec, registry
from models.checkpoint import model_from_checkpoint, title_of
from models.ops import BOPS_PER_OP, count_ops
from utils.cli import OneLineErrorParser, add_arch_flag, require_image_size, require_positive
from utils.errors import report_user_errors

DEFAULT_NUM_CLASSES = 1000
COLUMNS = ("layer", "kind", "input", "output", "MACs", "params")


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=224, help="side of the square input image")
    parser.add_argument("--num_classes", type=int, default=None,
                        help=f"classifier outputs (default: from the checkpoint, else {DEFAULT_NUM_CLASSES})")
    parser.add_argument("--step", type=int, choices=[1, 2], default=None,
                        help="1: real weights, 2: binary weights (default: from the checkpoint, else 2)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (ours or released)")
    add_arch_flag(parser, help_default=f"{ModelSpec.arch}; with --checkpoint, the checkpoint's")
    return parser


def build_model(args):
    """The network the flags describe, with the checkpoint's weights when one is given.

    Returns:
        (model, step).
    """
    if args.num_classes is not None:
        require_positive({"--num_classes": args.num_classes})
    if args.checkpoint:
        model, step = model_from_checkpoint(args.checkpoint, args.step)
    else:
        step = args.step or 2
        model = registry.build_model(ModelSpec(arch=args.arch), args.num_classes or DEFAULT_NUM_CLASSES, step == 2)
    require_image_size(args.image_size, arch=model.spec.arch)
    return model, step


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
    """The paper's BOPs, FLOPs and OPs of ``architecture`` at 224x224, labelled as reported."""
    costs = architecture.reported_costs
    return (f"paper:  BOPs {costs['bops']:.3g}, FLOPs {costs['flops']:.3g}, OPs {costs['ops']:.3g} "
            f"at 224x224 (reported by {costs['source']})")


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    model, step = build_model(args)
    counts = count_ops(model, args.image_size)
    print(f"{title_of(model)}, step {step} ({'binary' if step == 2 else 'real'} weights), "
          f"{model.fc.out_features} classes, {args.image_size}x{args.image_size} input")
    print(format_table(counts["layers"]))
    print(format_totals(counts))
    architecture = registry.get_architecture(model.spec.arch)
    if args.image_size == 224 and step == 2 and architecture.reported_costs:
        print(format_reported(architecture))
    return counts


if __name__ == "__main__":
    main()
