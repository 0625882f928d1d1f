"""Evaluates a checkpoint on DATA/val with the validation transforms.

Accepts this repository's checkpoints, which record what the run computes (architecture,
binarizers, step, image size, resize and crop, interpolation, normalisation: its RunSpec), and the
authors' released AdamBNN and ReActNet files (ReActNet-A, step 2, the published transforms). A flag
given explicitly wins over the checkpoint, and says so.

    python evaluate.py --data /path/to/imagenet --checkpoint step2/models/model_best.pth.tar
"""
import argparse
import os

from models.checkpoint import title_of
from utils.cli import (OneLineErrorParser, add_cpu_decode_share_flag, add_device_flag, add_jpeg_decoder_flag,
                       add_spec_flags, add_unreadable_flag, add_workers_flag, model_for,
                       require_image_size_in_memory, require_positive, require_share, resolve_device,
                       resolve_workers)
from utils.data import BACKENDS, SeededSampler, make_loader, open_split
from utils.errors import report_user_errors
from utils.evaluation import evaluate
from utils.pipeline import describe_jpeg_decoder


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
    add_spec_flags(parser, ("arch", "step", "image_size", "crop_pct", "resize_rounding", "interpolation", "mean", "std"))
    return parser


@report_user_errors
def main(argv=None):
    args = build_parser().parse_args(argv)
    require_positive({"--batch_size": args.batch_size})
    require_share("--max_unreadable_share", args.max_unreadable_share)
    if args.image_size is not None:
        require_image_size_in_memory(args.image_size)
    device = resolve_device(args.device)
    workers = resolve_workers(args.workers)
    model = model_for(args)
    spec = model.spec
    model.to(device)
    dataset = open_split(args.data, "val", spec, args.data_backend, num_classes=spec.num_classes,
                         cpu_decode_share=args.cpu_decode_share, jpeg_decoder=args.jpeg_decoder)
    loader = make_loader(dataset, SeededSampler(len(dataset), shuffle=False), args.batch_size,
                         workers, device.type == "cuda")
    print(f"=> evaluating {args.checkpoint} ({title_of(model)}) as step {spec.step} on {len(dataset)} images "
          f"of {os.path.join(args.data, 'val')} at {spec.image_size} px ({spec.describe_evaluation()})",
          flush=True)
    if dataset.jpeg_decoder:
        print(describe_jpeg_decoder(dataset.jpeg_decoder), flush=True)
    return evaluate(model, loader, device, args.amp, print_freq=args.print_freq,
                    max_unreadable_share=args.max_unreadable_share)


if __name__ == "__main__":
    main()
