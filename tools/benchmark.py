"""Training and data-loading throughput of a network (``--arch``, default ReActNet-A): the published
binarizers against ours.

For each AdamBNN training step (1: binary activations, 2: binary activations and weights) it times
full training iterations (training's own step: student forward and backward, teacher forward under
inference mode, distillation loss, Adam step) on a fixed synthetic batch, for these configurations:

- ``baseline``: the published binarizers (models/published.py), fp32, contiguous, for-loop/foreach Adam;
- ``ours``: this repository's binarizers with the default training flags (fp32), without the
  paper's measurements (as ``--no_metrics``);
- ``ours+metrics``: ``ours`` plus the flip-flop bookkeeping that training runs after every step by
  default, so the two rows give the measurements' cost;
- ``ours+bf16``, ``ours+channels_last``, ``ours+fused_adam``, ``ours+compile``: one speed flag each,
  as ``--amp bf16``, ``--channels_last``, ``--fused_optimizer`` and ``--compile`` set it in training;
- ``fastest``: ours with every flag that beat ``ours`` alone in a first timed pass (once per step,
  for every table), measured again.

Any ``ours+FLAG+FLAG...`` combination may be named with ``--configs``. The configurations are
timed in interleaved rounds (the order rotates every round) so that a machine shared with other
work slows all of them alike; the table reports medians. Memory is measured on extra iterations,
three ways (tools/bench/memory.py). The compute rows also give the floating-point operations of a
training image, hence how far each is from the device's arithmetic peak.

With a folder of generated JPEG files of ImageNet's size (``--loader_images`` of them):
``--loader`` adds the images/s of the data pipeline's workers alone, per ``--backends`` and per
``--loader_workers``; ``--end_to_end`` times real training steps of ``--end_to_end_configs`` fed by
the real loader with each backend (the ``gpu`` one with each of ``--jpeg_decoders`` and of
``--cpu_decode_shares``), and
reports the share of the time spent waiting for data and the peak device memory. On a CPU, freed
memory is kept for reuse as CPU training keeps it (``utils.runtime.keep_freed_host_memory``);
``--return_freed_memory`` measures with glibc's defaults instead.

    python -m tools.benchmark --image_size 64 --batch_size 32 --loader --end_to_end
    python -m tools.benchmark --device cuda --image_size 224 --batch_size 256

On a CPU shared with other work, set OMP_WAIT_POLICY=PASSIVE (or pass --threads 1): by default
OpenMP threads spin at the end of every parallel region waiting for their siblings, and when a
sibling has been descheduled the spinning makes a training step several times slower, by amounts
that depend on the load rather than on the configuration.
"""
import argparse
import json
import os
import sys
import tempfile

# Kineto, the profiler behind the CPU memory measurement, prints its start-up chatter on stderr
# unless told otherwise before torch loads.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from utils.startup import begin  # noqa: E402

begin(__name__)  # before the slow imports below: see utils/startup.py

import torch  # noqa: E402

from models import RunSpec  # noqa: E402
from tools.bench import memory  # noqa: E402
from tools.bench.compute import benchmark_training  # noqa: E402
from tools.bench.loader import benchmark_loader  # noqa: E402
from tools.bench.report import device_name, render  # noqa: E402
from tools.bench.jpeg_folder import write_jpeg_folder  # noqa: E402
from tools.bench.variants import FLAGS, SPEED_FLAGS, parse_variant  # noqa: E402
from utils.data import BACKENDS, CPU_DECODE_SHARE, require_cpu_decode_share  # noqa: E402
from utils.cli import (OneLineErrorParser, add_device_flag, require_at_least, require_count,  # noqa: E402
                       require_image_size, resolve_device, resolve_workers)
from utils.errors import UserError, report_user_errors  # noqa: E402
from utils.pipeline import JPEG_DECODERS, jpeg_decoder_for  # noqa: E402
from utils.runtime import keep_freed_host_memory  # noqa: E402

DEFAULT_CONFIGS = ["baseline", "ours", "ours+metrics", *(f"ours+{flag}" for flag in SPEED_FLAGS), "fastest"]


def build_parser():
    parser = OneLineErrorParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Configurations: baseline, fastest, ours, ours+FLAG[+FLAG...] with FLAG among "
               + ", ".join(FLAGS) + " (metrics: the paper's per-iteration flip-flop bookkeeping).")
    add_device_flag(parser)
    parser.add_argument("--arch", default=RunSpec.arch, help="registered architecture (models/)")
    parser.add_argument("--image_size", type=int, default=64, help="training crop of the synthetic batch")
    parser.add_argument("--batch_size", type=int, default=32, help="images per iteration (and per loader batch)")
    parser.add_argument("--steps", type=int, default=3, help="timed iterations per round")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed iterations before measuring (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timing rounds (and timed loader epochs); medians are reported")
    parser.add_argument("--num_classes", type=int, default=1000, help="classes of student and teacher")
    parser.add_argument("--teacher", default="resnet34", help="torchvision model name of the teacher")
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS,
                        help="configurations to measure")
    parser.add_argument("--fastest_from", nargs="*", choices=SPEED_FLAGS, default=list(SPEED_FLAGS),
                        help="speed flags the fastest combination may use")
    parser.add_argument("--recipe_steps", type=int, nargs="*", choices=[1, 2], default=[1, 2],
                        help="AdamBNN steps to measure: 1 (real weights), 2 (binary weights); "
                             "none: only the loader")
    parser.add_argument("--return_freed_memory", action="store_true",
                        help="leave glibc's malloc at its defaults; without this flag a CPU benchmark "
                             "keeps freed memory for reuse, as CPU training does")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before measuring; torch's default if not given")
    parser.add_argument("--seed", type=int, default=0, help="seeds the models, the batch and the files")
    parser.add_argument("--loader", action="store_true",
                        help="also measure the data loader's workers alone")
    parser.add_argument("--loader_images", type=int, default=256,
                        help="JPEG files generated for --loader and --end_to_end")
    parser.add_argument("--loader_image_size", type=int, default=RunSpec.image_size,
                        help="RandomResizedCrop size of the loader benchmark")
    parser.add_argument("--loader_workers", type=int, nargs="+", default=[0, 1, 2],
                        help="worker counts of the loader benchmark")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                        help="data backends of --loader and --end_to_end")
    parser.add_argument("--end_to_end", action="store_true",
                        help="also time training steps fed by the real loader from the JPEG files")
    parser.add_argument("--cpu_decode_shares", type=float, nargs="+", default=[CPU_DECODE_SHARE],
                        help="--end_to_end rows of the gpu backend, one per share of the JPEG files "
                             "decoded by PIL in the workers (as --cpu_decode_share in training)")
    parser.add_argument("--jpeg_decoders", nargs="+", choices=list(JPEG_DECODERS), default=None,
                        help="--end_to_end rows of the gpu backend, one per device JPEG decoder (as "
                             "--jpeg_decoder in training; default: the one training would choose)")
    parser.add_argument("--end_to_end_configs", nargs="+", default=["ours", "fastest"],
                        help="configurations trained end to end")
    parser.add_argument("--end_to_end_workers", type=int, default=None,
                        help="loader workers of --end_to_end (default: as training chooses them)")
    parser.add_argument("--end_to_end_iterations", type=int, default=10,
                        help="timed iterations per end-to-end row (after --warmup untimed ones)")
    parser.add_argument("--out", default=None,
                        help="also write the report to this file: JSON if it ends in .json, else markdown")
    return parser


@report_user_errors
def main(argv=None):
    """Runs the benchmark, prints the markdown report and returns it as a dict."""
    args = build_parser().parse_args(argv)
    require_at_least(1, {f"--{name}": getattr(args, name) for name in (
        "steps", "warmup", "repeats", "batch_size", "loader_images", "end_to_end_iterations")})
    require_count({f"--{name}": getattr(args, name) for name in (
        "steps", "warmup", "repeats", "batch_size", "loader_images", "end_to_end_iterations")})
    require_at_least(0, {"--loader_workers": min(args.loader_workers)})
    require_image_size(args.image_size, arch=args.arch)
    for share in args.cpu_decode_shares:
        require_cpu_decode_share(share, "--cpu_decode_shares")
    if args.end_to_end and "gpu" in args.backends:
        args.jpeg_decoders = [jpeg_decoder_for("gpu", name) for name in args.jpeg_decoders or [None]]
    args.end_to_end_workers = resolve_workers(args.end_to_end_workers)
    for name in args.configs + args.end_to_end_configs:
        if name != "fastest":
            try:
                parse_variant(name)
            except ValueError as e:
                raise UserError(str(e)) from None
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in training
    kept_freed_memory = device.type == "cpu" and not args.return_freed_memory and keep_freed_host_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(message):
        print(message, file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        if args.loader or args.end_to_end:
            log(f"writing {args.loader_images} JPEG files")
            write_jpeg_folder(os.path.join(folder, "train"), args.loader_images, args.seed)
        training, fed = benchmark_training(args, device, log, folder if args.end_to_end else None)
        loader = benchmark_loader(folder, args, log) if args.loader else []
    report = {
        "device_type": device.type,
        "machine": {"device": device_name(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
                    "keep_freed_host_memory": kept_freed_memory,
                    "load_before": load_before,
                    "load_after": os.getloadavg(), **{k: getattr(args, k) for k in (
                        "arch", "image_size", "batch_size", "num_classes", "teacher", "warmup", "repeats",
                        "steps", "loader_images", "loader_image_size", "end_to_end_workers",
                        "end_to_end_iterations")}},
        "memory_notes": memory.NOTES,
        "training": training,
        "end_to_end": fed,
        "loader": loader,
    }
    text = render(report)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            if args.out.endswith(".json"):
                json.dump(report, f, indent=2)
            else:
                f.write(text + "\n")
    return report


if __name__ == "__main__":
    main()
