"""AdamBNN step 2: ReActNet-A with binary activations and binary weights, started from step 1."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.startup import begin  # noqa: E402

begin(__name__)  # before the training's imports load torch: see utils/startup.py

from utils.trainer import main  # noqa: E402

if __name__ == "__main__":
    main(step=2)
