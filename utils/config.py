"""Command-line flags shared by step1/train.py and step2/train.py, with their checks.

Flag names follow the published code (``--data``, ``--batch_size``, ``--learning_rate``...), so
existing scripts carry over. Defaults are the AdamBNN recipe.
"""
import argparse
import os

from .data import MIN_IMAGE_SIZE
from .errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def step_dir(step):
    return os.path.join(REPO_ROOT, f"step{step}")


def default_step1_checkpoint():
    return os.path.join(step_dir(1), "models", "model_best.pth.tar")


def build_parser(step, weight_decay):
    parser = OneLineErrorParser(
        description=f"AdamBNN step {step}: train ReActNet-A with "
                    f"{'binary activations and real weights' if step == 1 else 'binary activations and weights'} "
                    f"by distillation from a real-valued teacher.")
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
    parser.add_argument("--batch_size", type=int, default=256, help="global batch size (all processes)")
    parser.add_argument("--epochs", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="default: 1.25e-3 with Adam, 0.1 with SGD")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="Adam (betas 0.9, 0.999; the paper's choice) or SGD with momentum 0.9")
    parser.add_argument("--weight_decay", type=float, default=weight_decay,
                        help=f"L2 on conv weights only (default {weight_decay:g})")
    parser.add_argument("--save", default=os.path.join(step_dir(step), "models"),
                        help="run folder: checkpoints, log, arguments (default: models/ beside this step)")
    parser.add_argument("--teacher", default="resnet34", help="torchvision model name of the teacher")
    parser.add_argument("--teacher_weights", default=None,
                        help="state_dict file of the teacher (default: torchvision's ImageNet weights)")
    parser.add_argument("-j", "--workers", type=int, default=None,
                        help="data-loading workers per process (default: from the CPU count)")
    parser.add_argument("--image_size", type=int, default=224,
                        help="training crop; validation resizes to round(size/0.875) then centre-crops")
    parser.add_argument("--seed", type=int, default=0, help="fixes data order, augmentation and init")
    parser.add_argument("--print_freq", type=int, default=1, help="print a progress line every N iterations")
    parser.add_argument("--save_every_iters", type=int, default=0,
                        help="also write a resumable checkpoint every N iterations (0: once per epoch)")
    parser.add_argument("--max_unreadable_share", type=float, default=0.5,
                        help="unreadable images are skipped with a warning; stop when more than this "
                             "share of one batch is unreadable")
    parser.add_argument("--no_metrics", action="store_true",
                        help="skip the paper's flip-flop ratio, C2I and saturation measurements")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None,
                        help="default: cuda when available")
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="autocast precision (default none: the published fp32 numerics)")
    parser.add_argument("--channels_last", action="store_true", help="NHWC memory format")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the student (backend default: inductor)")
    parser.add_argument("--fused_optimizer", action="store_true",
                        help="PyTorch's fused Adam kernel (faster; rounds slightly differently)")
    if step == 2:
        parser.add_argument("--step1_checkpoint", default=default_step1_checkpoint(),
                            help="step-1 weights to start from, loaded strictly "
                                 "(default: step1/models/model_best.pth.tar); 'none' trains from scratch")
    return parser


DEFAULT_LEARNING_RATES = {"adam": 1.25e-3, "sgd": 0.1}


def check_args(args, world_size=1):
    """Fills in defaults that depend on other flags; raises a UserError for values no run can use."""
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.optimizer]
    positive = {"--batch_size": args.batch_size, "--epochs": args.epochs,
                "--learning_rate": args.learning_rate, "--print_freq": args.print_freq}
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.weight_decay < 0:
        raise UserError(f"--weight_decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.max_unreadable_share < 1:
        raise UserError(f"--max_unreadable_share must be in [0, 1), got {args.max_unreadable_share}")
    if args.save_every_iters < 0:
        raise UserError(f"--save_every_iters must be >= 0, got {args.save_every_iters}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image_size {args.image_size} is too small: ReActNet-A downsamples by 32, "
                        f"use at least {MIN_IMAGE_SIZE}")
    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide among "
                        f"{world_size} processes: use a multiple of {world_size}")
    if not os.path.isdir(args.data):
        raise UserError(f"data folder {args.data} does not exist: --data must hold train/ and val/")
