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
    """
    name: str
    title: str
    optimizer: str
    learning_rates: dict
    weight_decays: dict
    epochs: int
    batch_size: int
    teacher: str


RECIPES = {}


def register_recipe(recipe):
    if recipe.name in RECIPES:
        raise ValueError(f"recipe '{recipe.name}' is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name):
    """The recipe registered as ``name``; a UserError naming the known ones otherwise."""
    if name not in RECIPES:
        raise UserError(f"unknown recipe '{name}' (known: {', '.join(sorted(RECIPES))}): pass one of "
                        f"them as --recipe")
    return RECIPES[name]


# AdamBNN (Liu et al., ICML 2021): two steps of 256 epochs, Adam at 1.25e-3 for batch 256 (SGD at
# 0.1 for its comparison), weight decay 5e-6 in step 1 and 0 in step 2, a ResNet-34 teacher.
ADAMBNN = register_recipe(Recipe(
    name="adambnn", title="AdamBNN", optimizer="adam", learning_rates={"adam": 1.25e-3, "sgd": 0.1},
    weight_decays={1: 5e-6, 2: 0.0}, epochs=256, batch_size=256, teacher="resnet34"))
