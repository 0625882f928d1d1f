"""Training recipes by name: the values the training flags default to, each written once.

A run's recipe is its RunSpec's ``recipe`` (``--recipe``, else the checkpoint's, else its
architecture's, else ``adambnn``); a flag given explicitly wins over the recipe's value. A new
recipe is a Recipe registered with ``register_recipe``.
"""
from dataclasses import dataclass

from .errors import UserError

# What each step trains: step 1 binary activations with real weights, step 2 binary weights too.
STEP_DESCRIPTIONS = {1: "binary activations and real weights", 2: "binary activations and weights"}
ADAM_BETAS = (0.9, 0.999)
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class Recipe:
    """A named training recipe.

    Attributes:
        name: the ``--recipe`` value, saved in the RunSpec.
        title: how help texts and logs name it.
        optimizer: the default ``--optimizer``.
        learning_rates: the default ``--learning_rate`` of each optimizer.
        weight_decays: the default ``--weight_decay`` of each step (1, 2).
        epochs: the default ``--epochs`` of each step.
        batch_size: the default global ``--batch_size`` (all processes together).
        teacher: the default ``--teacher``, a torchvision model name.
        steps: the steps (train scripts) it trains in.
        schedule: its learning-rate schedule, ``linear`` or ``warmup_cosine``
            (``utils.optim.learning_rate_factor``).
        groups: how its optimizer splits the parameters for weight decay, ``adambnn`` or ``bnext``
            (``utils.optim.parameter_groups``).
    """
    name: str
    title: str
    optimizer: str
    learning_rates: dict
    weight_decays: dict
    epochs: int
    batch_size: int
    teacher: str
    steps: tuple = (1, 2)
    schedule: str = "linear"
    groups: str = "adambnn"


RECIPES = {}


def register_recipe(recipe):
    if recipe.name in RECIPES:
        raise ValueError(f"recipe '{recipe.name}' is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name, step=None):
    """The recipe registered as ``name``; a UserError naming the known ones otherwise, or when it
    does not train in ``step``."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))}): pass one of "
                        f"them as --recipe")
    recipe = RECIPES[name]
    if step is not None and step not in recipe.steps:
        raise UserError(f"--recipe {name} trains in one step, step 2, with binary weights from the start: "
                        f"run it as RECIPE={name} STEP1_CHECKPOINT=none bash step2/run.sh")
    return recipe


# AdamBNN (Liu et al., ICML 2021): two steps of 256 epochs, Adam at 1.25e-3 for batch 256 (SGD at
# 0.1 for its comparison), weight decay 5e-6 in step 1 and 0 in step 2, a ResNet-34 teacher.
ADAMBNN = register_recipe(Recipe(
    name="adambnn", title="AdamBNN", optimizer="adam", learning_rates={"adam": 1.25e-3, "sgd": 0.1},
    weight_decays={1: 5e-6, 2: 0.0}, epochs=256, batch_size=256, teacher="resnet34"))


# BNext (Guo et al. 2022), its published one-step recipe: AdamW at 1e-3 for batch 512, 512 epochs;
# the 4-D parameters and those of the binary convs decay by 1e-8, the others by --weight_decay
# (1e-3); timm's cosine schedule per epoch, after a 5-epoch linear warm-up from 1e-5, down to 1e-7.
# Distillation is from this repository's single teacher (--teacher), not BNext's curriculum of
# several teachers; the augmentation is this repository's, not timm's RandAugment.
BNEXT_CONV_WEIGHT_DECAY = 1e-8
BNEXT_WARMUP_EPOCHS = 5
BNEXT_WARMUP_START_RATE = 1e-5
BNEXT_FINAL_RATE = 1e-7
BNEXT = register_recipe(Recipe(
    name="bnext", title="BNext", optimizer="adamw", learning_rates={"adamw": 1e-3},
    weight_decays={2: 1e-3}, epochs=512, batch_size=512, teacher="resnet34", steps=(2,),
    schedule="warmup_cosine", groups="bnext"))
