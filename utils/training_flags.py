"""Command-line flags of step1/train.py and step2/train.py, with their defaults and checks.

Flag names follow the published code (``--data``, ``--batch_size``, ``--learning_rate``...), so
existing scripts carry over. The flags of the RunSpec (models/spec.py) default to the checkpoint
resumed or started from, else the architecture's values; the training flags default to the run's
recipe (utils/recipe.py). Both are known only once the run folder's checkpoint is read, so the
parser leaves them None and the trainer fills them in (``fill_defaults``).
"""
import os

from .cli import (OneLineErrorParser, SPEC_FLAGS, add_cpu_decode_share_flag, add_data_timeout_flag,
                  add_device_flag, add_jpeg_decoder_flag, add_spec_flags, add_unreadable_flag,
                  add_workers_flag, require_at_least, require_count, require_image_size_in_memory,
                  require_positive, require_seed, require_share, require_spec)
from .data import BACKENDS, require_cpu_decode_share
from .errors import UserError
from .recipe import BNEXT_CONV_WEIGHT_DECAY, RECIPES, STEP_DESCRIPTIONS

# The RunSpec flags of the train scripts: all but the step (the script's) and the classes (the data's).
TRAINING_SPEC_FLAGS = tuple(name for name in SPEC_FLAGS if name not in ("step", "num_classes"))
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def step_dir(step):
    return os.path.join(REPO_ROOT, f"step{step}")


def default_step1_checkpoint():
    return os.path.join(step_dir(1), "models", "model_best.pth.tar")


def recipe_default(value, step):
    """How help texts show a flag's default from the recipes: ``value(recipe)`` for each recipe
    that trains in ``step``."""
    return "the recipe's (" + ", ".join(f"{name}: {value(r)}" for name, r in RECIPES.items()
                                        if step in r.steps) + ")"


def learning_rates_text(recipe):
    return " or ".join(f"{rate:g} with {optimizer}" for optimizer, rate in recipe.learning_rates.items())


def build_parser(step):
    """The flags of AdamBNN step ``step`` (1 or 2); step 2 adds ``--step1_checkpoint``."""
    parser = OneLineErrorParser(
        description=f"AdamBNN step {step}: train a binary network (ReActNet-A by default) with "
                    f"{STEP_DESCRIPTIONS[step]} by distillation from a real-valued teacher.")
    parser.add_argument("--data", required=True, help="ImageFolder root holding train/ and val/")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"global batch size (all processes) (default: "
                             f"{recipe_default(lambda r: r.batch_size, step)})")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs of this step; the learning rate falls to 0 over them (adambnn: "
                             f"linearly; bnext: after a 5-epoch warm-up, along a cosine to 1e-7) "
                             f"(default: {recipe_default(lambda r: r.epochs, step)})")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help=f"default: {recipe_default(learning_rates_text, step)}")
    parser.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default=None,
                        help=f"Adam (betas 0.9, 0.999; AdamBNN's choice), AdamW (BNext's) or SGD with "
                             f"momentum 0.9 "
                             f"(default: {recipe_default(lambda r: r.optimizer, step)})")
    parser.add_argument("--weight_decay", type=float, default=None,
                        help=f"adambnn: L2 on conv weights and learnable shifts, as published; bnext: on "
                             f"the parameters other than the 4-D ones and the binary convs' (those decay "
                             f"by {BNEXT_CONV_WEIGHT_DECAY:g}) (default: "
                             f"{recipe_default(lambda r: f'{r.weight_decays[step]:g}', step)})")
    parser.add_argument("--save", default=os.path.join(step_dir(step), "models"),
                        help="run folder: checkpoints, log, arguments (default: models/ beside this step)")
    parser.add_argument("--teacher", default=None,
                        help=f"torchvision model name of the teacher (default: "
                             f"{recipe_default(lambda r: r.teacher, step)})")
    parser.add_argument("--teacher_weights", default=None,
                        help="state_dict file of the teacher (default: torchvision's ImageNet weights)")
    add_workers_flag(parser)
    parser.add_argument("--data_backend", choices=BACKENDS, default="pil",
                        help="where images are decoded and resized: pil (in the loader's workers, the "
                             "published pixels) or gpu (JPEGs decoded on the device; see docs/data.md)")
    add_cpu_decode_share_flag(parser)
    add_jpeg_decoder_flag(parser)
    parser.add_argument("--seed", type=int, default=0, help="fixes data order, augmentation and init")
    parser.add_argument("--print_freq", type=int, default=1, help="print a progress line every N iterations")
    parser.add_argument("--save_every_iters", type=int, default=0,
                        help="also write a resumable checkpoint every N iterations (0: once per epoch)")
    add_unreadable_flag(parser)
    add_data_timeout_flag(parser, saves=True)
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
                             "size, teacher (or its weights' content), image size, crop_pct, "
                             "interpolation, mean, std, seed, data folder or data backend differ from "
                             "its checkpoint, continuing with the new "
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
    add_spec_flags(parser, TRAINING_SPEC_FLAGS, "on resume the run's checkpoint's" if step == 1 else
                   "on resume the run's checkpoint's, else the --step1_checkpoint's")
    return parser


def fill_defaults(args, recipe, step):
    """Sets the training flags not given to ``recipe``'s values for ``step``; the learning rate
    follows the optimizer."""
    defaults = {"optimizer": recipe.optimizer, "weight_decay": recipe.weight_decays.get(step),
                "epochs": recipe.epochs, "batch_size": recipe.batch_size, "teacher": recipe.teacher}
    for flag, value in defaults.items():
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    if args.learning_rate is None:
        if args.optimizer not in recipe.learning_rates:
            raise UserError(f"the {recipe.name} recipe has no learning rate for --optimizer {args.optimizer}: "
                            f"pass --learning_rate")
        args.learning_rate = recipe.learning_rates[args.optimizer]
    return args


def validate(args):
    """Raises a UserError for values given that no run can use, before anything is built; the
    values that the checkpoint and the recipe fill in are checked once known (``validate_resolved``)."""
    given = {flag: value for flag, value in vars(args).items() if value is not None}
    require_positive({f"--{flag}": given[flag] for flag in ("batch_size", "epochs", "learning_rate",
                                                            "print_freq") if flag in given})
    require_count({f"--{flag}": given[flag] for flag in ("batch_size", "epochs", "print_freq", "save_every_iters")
                   if flag in given})
    require_at_least(0, {f"--{flag}": given[flag] for flag in ("weight_decay", "save_every_iters", "workers",
                                                             "data_timeout") if flag in given})
    if not args.save:
        raise UserError("--save is empty: name the run folder for checkpoints and logs")
    require_share("--max_unreadable_share", args.max_unreadable_share)
    require_cpu_decode_share(args.cpu_decode_share)
    if args.image_size is not None:
        require_image_size_in_memory(args.image_size)
    require_seed(args.seed)
    if not os.path.isdir(args.data):
        raise UserError(f"data folder {args.data} does not exist: --data must hold train/ and val/")


def validate_resolved(args, spec, world_size=1):
    """Raises a UserError for a resolved RunSpec no run can compute with, or a global batch that
    does not divide among the processes."""
    require_spec(spec)
    if args.batch_size % world_size:
        raise UserError(f"--batch_size {args.batch_size} (the global batch) does not divide among "
                        f"{world_size} processes: use a multiple of {world_size}")


def step1_checkpoint(args):
    """The step-1 file step 2 starts from, or None (step 1, or step 2 with 'none')."""
    path = getattr(args, "step1_checkpoint", None)
    return None if path is None or path.lower() == "none" else path
