"""Evaluates a ReActNet-A checkpoint on DATA/val with the validation transforms.

Accepts this repository's checkpoints (step 1 or step 2, read from their metadata) and the authors'
released AdamBNN and ReActNet files (step 2).

    python evaluate.py --data /path/to/imagenet --checkpoint step2/models/model_best.pth.tar
"""
import argparse
import os

import torch

from models.checkpoint import model_from_checkpoint
from utils.config import OneLineErrorParser
from utils.data import MIN_IMAGE_SIZE, SeededSampler, default_workers, make_loader, open_split, val_transform
from utils.engine import evaluate
from utils.errors import UserError, report_user_errors


def parse_args(argv=None):
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="ImageFolder root holding val/")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file (ours or released)")
    parser.add_argument("--step", type=int, choices=[1, 2], default=None,
                        help="1: real weights, 2: binary weights (default: from the checkpoint; "
                             "2 for released files)")
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("-j", "--workers", type=int, default=None)
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    parser.add_argument("--print_freq", type=int, default=10)
    return parser.parse_args(argv)


@report_user_errors
def main(argv=None):
    args = parse_args(argv)
    if args.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image_size must be at least {MIN_IMAGE_SIZE}, got {args.image_size}")
    if args.batch_size <= 0:
        raise UserError(f"--batch_size must be positive, got {args.batch_size}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, step = model_from_checkpoint(args.checkpoint, args.step)
    model.to(device)
    dataset = open_split(args.data, "val", val_transform(args.image_size),
                         num_classes=model.fc.out_features)
    workers = default_workers() if args.workers is None else args.workers
    loader = make_loader(dataset, SeededSampler(len(dataset), shuffle=False), args.batch_size,
                         workers, device.type == "cuda")
    print(f"=> evaluating {args.checkpoint} as step {step} on {len(dataset)} images of "
          f"{os.path.join(args.data, 'val')}", flush=True)
    return evaluate(model, loader, device, args.amp, print_freq=args.print_freq)


if __name__ == "__main__":
    main()
