"""Command-line flags of step1/train.py and step2/train.py, with their defaults and checks.

Flag names follow the published code (``--data``, ``--batch_size``, ``--learning_rate``...), so
existing scripts carry over. Defaults come from the recipe (utils/recipe.py).
"""
import os

from . import recipe
from models import ModelSpec

from .cli import (OneLineErrorParser, add_cpu_decode_share_flag, add_device_flag, add_jpeg_decoder_flag,
                  add_model_flags, add_unreadable_flag, add_workers_flag, require_at_least,
                  require_count, require_image_size, require_positive, require_seed,
                  require_share)
from .data import BACKENDS, require_cpu_decode_share
from .errors import UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_dir(step):
    return os.path.join(REPO_ROOT, f"step{step}")


def default_step1_checkpoint():
    return os.path.join(step_dir(1), "models", "model_best.pth.tar")


def build_parser(step):
    """The flags of AdamBNN step ``step`` (1 or 2); step 2 adds ``--step1_checkpoint``."""
    step_recipe = recipe.STEPS[step]
    parser = OneLineErrorParser(
        description=f"AdamBNN step {step}: train a binary network (ReActNet-A by default) with "
                    f"{step_recipe.description} by distillation from a real-valued teacher.")
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
    add_model_flags(parser)
    parser.add_argument("--batch_size", type=int, default=recipe.BATCH_SIZE,
                        help="global batch size (all processes)")
    parser.add_argument("--epochs", type=int, default=recipe.EPOCHS,
                        help="epochs of this step; the learning rate falls linearly to 0 over them")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help=f"default: {recipe.LEARNING_RATES['adam']:g} with Adam, "
                             f"{recipe.LEARNING_RATES['sgd']:g} with SGD")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="Adam (betas 0.9, 0.999; the paper's choice) or SGD with momentum 0.9")
    parser.add_argument("--weight_decay", type=float, default=step_recipe.weight_decay,
                        help=f"L2 on conv weights and learnable shifts, as published "
                             f"(default {step_recipe.weight_decay:g})")
    parser.add_argument("--save", default=os.path.join(step_dir(step), "models"),
                        help="run folder: checkpoints, log, arguments (default: models/ beside this step)")
    parser.add_argument("--teacher", default=recipe.TEACHER, help="torchvision model name of the teacher")
    parser.add_argument("--teacher_weights", default=None,
                        help="state_dict file of the teacher (default: torchvision's ImageNet weights)")
    add_workers_flag(parser)
    parser.add_argument("--data_backend", choices=BACKENDS, default="pil",
                        help="where images are decoded and resized: pil (in the loader's workers, the "
                             "published pixels) or gpu (JPEGs decoded on the device; see docs/data.md)")
    add_cpu_decode_share_flag(parser)
    add_jpeg_decoder_flag(parser)
    parser.add_argument("--image_size", type=int, default=224,
                        help="training crop; validation resizes to round(size/0.875) then centre-crops")
    parser.add_argument("--seed", type=int, default=0, help="fixes data order, augmentation and init")
    parser.add_argument("--print_freq", type=int, default=1, help="print a progress line every N iterations")
    parser.add_argument("--save_every_iters", type=int, default=0,
                        help="also write a resumable checkpoint every N iterations (0: once per epoch)")
    add_unreadable_flag(parser)
    parser.add_argument("--no_metrics", action="store_true",
                        help="skip the paper's flip-flop ratio, C2I and saturation measurements")
    add_device_flag(parser)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="autocast precision (default none: the published fp32 numerics)")
    parser.add_argument("--channels_last", action="store_true", help="NHWC memory format")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                        help="torch.compile the student and the teacher (backend default: inductor)")
    parser.add_argument("--fused_optimizer", action="store_true",
                        help="PyTorch's fused Adam kernel (faster; rounds slightly differently)")
    parser.add_argument("--resume_with_changes", action="store_true",
                        help="resume a run folder although learning rate, weight decay, epochs, batch "
                             "size, teacher (or its weights' content), image size, seed, data folder "
                             "or data backend differ from its checkpoint, continuing with the new "
                             "values (the speed flags --amp, --fused_optimizer, --channels_last, "
                             "--compile, --deterministic and --jpeg_decoder may change without it; "
                             "every change is recorded in the checkpoint's flag_changes)")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic GPU kernels (cuDNN deterministic, no autotuning, "
                             "torch.use_deterministic_algorithms), so a resumed GPU run is bit-identical; slower")
    if step == 2:
        parser.add_argument("--step1_checkpoint", default=default_step1_checkpoint(),
                            help="step-1 weights to start from, loaded strictly "
                                 "(default: step1/models/model_best.pth.tar); 'none' trains from scratch; "
                                 "a resumed run refuses weights other than those it started from")
    return parser


def fill_defaults(args):
    """Sets the defaults that depend on other flags (the learning rate follows the optimizer)."""
    if args.learning_rate is None:
        args.learning_rate = recipe.LEARNING_RATES[args.optimizer]
    return args


def validate(args, world_size=1):
    """Raises a UserError for values no run can use, before anything is built."""
    require_positive({"--batch_size": args.batch_size, "--epochs": args.epochs,
                      "--learning_rate": args.learning_rate, "--print_freq": args.print_freq})
    require_count({"--batch_size": args.batch_size, "--epochs": args.epochs, "--print_freq": args.print_freq,
                   "--save_every_iters": args.save_every_iters})
    require_at_least(0, {"--weight_decay": args.weight_decay,
                         "--save_every_iters": args.save_every_iters})
    if args.workers is not None:
        require_at_least(0, {"--workers": args.workers})
    require_share("--max_unreadable_share", args.max_unreadable_share)
    require_cpu_decode_share(args.cpu_decode_share)
    require_image_size(args.image_size, arch=args.arch or ModelSpec.arch)
    require_seed(args.seed)
    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide among "
                        f"{world_size} processes: use a multiple of {world_size}")
    if not args.save:
        raise UserError("--save is empty: name the run folder for checkpoints and logs")
    if not os.path.isdir(args.data):
        raise UserError(f"data folder {args.data} does not exist: --data must hold train/ and val/")


def step1_checkpoint(args):
    """The step-1 file step 2 starts from, or None (step 1, or step 2 with 'none')."""
    path = getattr(args, "step1_checkpoint", None)
    return None if path is None or path.lower() == "none" else path
