"""AdamBNN step 2: ReActNet-A with binary activations and binary weights, started from step 1."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.engine import main  # noqa: E402


def step1_weights(args):
    return None if args.step1_checkpoint.lower() == "none" else args.step1_checkpoint


if __name__ == "__main__":
    main(step=2, binary_weights=True, weight_decay=0.0, init_from=step1_weights)
