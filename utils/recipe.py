"""The AdamBNN training recipe, written once.

The two steps differ only in which weights are binary and in the weight decay; everything else is
shared. ``step*/run.sh`` repeat these values as visible variables, since they are what a user edits.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class StepRecipe:
    """What one AdamBNN step trains.

    Attributes:
        binary_weights: the student's convolution weights are binarized (step 2) or real (step 1).
        weight_decay: L2 on the decayed group (see ``utils.optim.decayed``).
        description: what is binary, for help texts and logs.
    """
    binary_weights: bool
    weight_decay: float
    description: str


STEPS = {
    1: StepRecipe(binary_weights=False, weight_decay=5e-6,
                  description="binary activations and real weights"),
    2: StepRecipe(binary_weights=True, weight_decay=0.0,
                  description="binary activations and weights"),
}
LEARNING_RATES = {"adam": 1.25e-3, "sgd": 0.1}  # Adam is the paper's; SGD for its comparison
ADAM_BETAS = (0.9, 0.999)
SGD_MOMENTUM = 0.9
EPOCHS = 256
BATCH_SIZE = 256  # global, over all processes
TEACHER = "resnet34"
