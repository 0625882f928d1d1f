"""Evaluates a checkpoint on DATA/val with the validation transforms.

Accepts this repository's checkpoints, which record what the run computes (architecture,
binarizers, step, image size, resize and crop, interpolation, normalisation: its RunSpec), and the
authors' released AdamBNN and ReActNet files (ReActNet-A, step 2, the published transforms). A flag
given explicitly wins over the checkpoint, and says so.

    python evaluate.py --data /path/to/imagenet --checkpoint step2/models/model_best.pth.tar
"""
import argparse
import os

from utils.startup import begin

begin(__name__)  # before the slow imports below: see utils/startup.py

from models.checkpoint import title_of  # noqa: E402
from utils.cli import (OneLineErrorParser, add_cpu_decode_share_flag, add_data_timeout_flag,  # noqa: E402
                       add_device_flag, add_jpeg_decoder_flag, add_spec_flags, add_unreadable_flag,
                       add_workers_flag, model_for, require_at_least, require_count,
                       require_image_size_in_memory, require_positive, require_share, resolve_device,
                       resolve_workers)
from utils.data import (BACKENDS, IMAGENET_CLASSES, WNID, SeededSampler, imagenet_synsets,  # noqa: E402
                        make_loader, open_split, require_classes)
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.evaluation import evaluate  # noqa: E402
from utils.pipeline import describe_jpeg_decoder  # noqa: E402


def build_parser():
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder root holding val/")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (ours or released)")
    parser.add_argument("--batch_size", type=int, default=256, help="images per batch (all processes)")
    add_workers_flag(parser)
    parser.add_argument("--data_backend", choices=BACKENDS, default="pil",
                        help="where images are decoded and resized: pil (in the loader's workers) or "
                             "gpu (on the device; see docs/data.md)")
    add_cpu_decode_share_flag(parser)
    add_jpeg_decoder_flag(parser)
    add_device_flag(parser)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="autocast precision (default none: fp32)")
    parser.add_argument("--print_freq", type=int, default=10, help="print a progress line every N batches")
    add_unreadable_flag(parser)
    add_data_timeout_flag(parser)
    add_spec_flags(parser, ("arch", "step", "image_size", "crop_pct", "resize_rounding", "interpolation", "mean", "std"))
    return parser


def check_classes(model, classes, folder, path):
    """A UserError unless ``classes``, the class folders of ``folder`` in label order, are those the
    checkpoint ``path`` was trained on: its own record, or for a file that records none and
    predicts 1000 classes (the released ones), ImageNet's synsets in their order. Folders that are
    not synset IDs cannot be checked against them: a note says so. A checkpoint that records no
    classes otherwise has only their number checked."""
    recorded = model.classes
    if recorded is None and model.spec.num_classes == IMAGENET_CLASSES:
        if all(WNID.fullmatch(name) for name in classes):
            recorded, path = imagenet_synsets(), f"{path} (ImageNet's synsets, as it records no classes)"
        else:
            odd = next(name for name in classes if not WNID.fullmatch(name))
            print(f"=> note: {path} records no class names and is taken to predict ImageNet's 1000 "
                  f"classes in synset order (n01440764 first); the class folders of {folder} are not "
                  f"synset IDs (e.g. '{odd}'), so their order is not checked: the accuracy holds only "
                  f"if they sort in that order", flush=True)
    if recorded is not None:
        require_classes(recorded, classes, folder, path, "evaluate it on a val/ folder of those classes")
    elif len(classes) != model.spec.num_classes:
        raise UserError(f"the model predicts {model.spec.num_classes} classes but {folder} has "
                        f"{len(classes)} class folders: evaluate it on a val/ folder of its classes")


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    require_positive({"--batch_size": args.batch_size})
    require_count({"--batch_size": args.batch_size})
    require_at_least(0, {"--data_timeout": args.data_timeout})
    require_share("--max_unreadable_share", args.max_unreadable_share)
    if args.image_size is not None:
        require_image_size_in_memory(args.image_size)
    device = resolve_device(args.device)
    workers = resolve_workers(args.workers)
    model = model_for(args)
    spec = model.spec
    model.to(device)
    dataset = open_split(args.data, "val", spec, args.data_backend, cpu_decode_share=args.cpu_decode_share,
                         jpeg_decoder=args.jpeg_decoder)
    check_classes(model, dataset.classes, os.path.join(args.data, "val"), args.checkpoint)
    loader = make_loader(dataset, SeededSampler(len(dataset), shuffle=False), args.batch_size,
                         workers, device.type == "cuda")
    print(f"=> evaluating {args.checkpoint} ({title_of(model)}) as step {spec.step} on {len(dataset)} images "
          f"of {os.path.join(args.data, 'val')} at {spec.image_size} px ({spec.describe_evaluation()})",
          flush=True)
    if dataset.jpeg_decoder:
        print(describe_jpeg_decoder(dataset.jpeg_decoder), flush=True)
    return evaluate(model, loader, device, args.amp, print_freq=args.print_freq,
                    max_unreadable_share=args.max_unreadable_share, timeout=args.data_timeout)


if __name__ == "__main__":
    main()
