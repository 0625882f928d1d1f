"""What a run computes besides its weights and optimizer: the RunSpec, resolved once.

A RunSpec names the network (architecture, binarizers, step, classes), the images it takes (size,
the validation resize and crop, interpolation, normalisation) and the training recipe. Training
saves it in args.json and in every checkpoint; every command that reads a checkpoint rebuilds the
network and its transforms from it, with no flag.

Where each field comes from, later sources winning (``resolve``):

1. RunSpec's own defaults: the published values, which the authors' released files (no spec) get;
2. the architecture's ``defaults`` (``register_architecture(..., defaults={...})``);
3. what the checkpoint recorded, when there is one (a resumed run, step 2's start, any tool);
4. the flags given explicitly, each difference from the checkpoint reported as an override.
"""
import dataclasses
import math
from dataclasses import asdict, dataclass

from models.layers import set_binarizers
from models.registry import RegistryError, get_architecture

INTERPOLATIONS = ("bilinear", "bicubic")
RESIZE_ROUNDINGS = {"round": round, "floor": math.floor}


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines what a run computes besides its weights and optimizer.

    Attributes:
        arch: the registered architecture (``--arch``).
        act_binarizer: the registered activation binarizer (``--act_binarizer``).
        weight_binarizer: the registered weight binarizer of step 2 (``--weight_binarizer``).
        image_size: the side of the square images the network takes, in training and evaluation.
        crop_pct: evaluation resizes the shorter side to ``round(image_size / crop_pct)`` and
            centre-crops ``image_size``: the share of the resized side that the crop keeps.
        interpolation: of every resize, training's random crop included: one of INTERPOLATIONS.
        resize_rounding: how ``image_size / crop_pct`` becomes the resized side: ``round`` (this
            repository's generalisation of the published Resize(256) at 224) or ``floor`` (timm's,
            as BNext evaluates: 235 at 224 with crop_pct 0.95); one of RESIZE_ROUNDINGS.
        mean: per RGB channel, subtracted from the pixels scaled to [0, 1].
        std: per RGB channel, what the pixels are then divided by.
        num_classes: classifier outputs.
        step: 1 (binary activations, real weights) or 2 (binary weights too).
        recipe: the training recipe whose values the training flags default to (utils/recipe.py).
    """
    arch: str = "reactnet_a"
    act_binarizer: str = "polynomial"
    weight_binarizer: str = "scaled_sign"
    image_size: int = 224
    crop_pct: float = 0.875  # Resize(256) before CenterCrop(224)
    interpolation: str = "bilinear"
    resize_rounding: str = "round"
    mean: tuple = (0.485, 0.456, 0.406)  # ImageNet's
    std: tuple = (0.229, 0.224, 0.225)
    num_classes: int = 1000
    step: int = 2  # what the released files hold
    recipe: str = "adambnn"

    @property
    def binary_weights(self):
        """Whether the convolutions fed binary activations binarize their weights (step 2)."""
        return self.step == 2

    def resized_side(self):
        """The side evaluation resizes the shorter side to before its centre crop."""
        return RESIZE_ROUNDINGS[self.resize_rounding](self.image_size / self.crop_pct)

    def describe_evaluation(self):
        """The validation transform in words, as the commands print it."""
        return (f"{self.interpolation} resize of the shorter side to {self.resized_side()}, centre crop "
                f"{self.image_size}")

    def as_dict(self):
        return asdict(self)


FIELDS = tuple(field.name for field in dataclasses.fields(RunSpec))
# What the run itself fixes, not the architecture: which one it is, its step and its classes.
RUN_FIELDS = ("arch", "step", "num_classes")
ARCHITECTURE_FIELDS = tuple(name for name in FIELDS if name not in RUN_FIELDS)


def architecture_defaults(arch):
    """RunSpec's defaults with architecture ``arch``'s own in place of them.

    Raises:
        RegistryError: ``arch`` is unknown, or its defaults name something else than
            ARCHITECTURE_FIELDS.
    """
    defaults = get_architecture(arch).defaults
    unknown = sorted(set(defaults) - set(ARCHITECTURE_FIELDS))
    if unknown:
        raise RegistryError(f"architecture '{arch}' registers defaults for {', '.join(unknown)}: an "
                            f"architecture may set only {', '.join(ARCHITECTURE_FIELDS)}")
    return RunSpec(arch=arch, **as_spec_values(defaults))


def as_spec_values(values):
    """``values`` with the lists that JSON and checkpoints hold for ``mean``/``std`` as tuples."""
    return {name: tuple(value) if isinstance(value, list) else value for name, value in values.items()}


def recorded_fields(checkpoint):
    """The RunSpec fields a checkpoint dict records, ``{field: value}``; none for released files.

    Checkpoints written before every field was recorded name the model (``arch``, the binarizers)
    and keep their image size in ``args``.
    """
    recorded = {}
    if isinstance(checkpoint.get("args"), dict) and "image_size" not in checkpoint:
        recorded["image_size"] = checkpoint["args"].get("image_size")
    recorded.update({name: checkpoint[name] for name in FIELDS if name in checkpoint})
    return {name: value for name, value in as_spec_values(recorded).items()
            if isinstance(value, type(getattr(RunSpec, name))) and not isinstance(value, bool)}


def resolve(given, recorded=None):
    """The RunSpec from the architecture's defaults, what a checkpoint recorded, and the flags given.

    Args:
        given: ``{field: value}`` of the flags given explicitly; a None value was not given.
        recorded: ``recorded_fields`` of the checkpoint the run continues or the tool reads, or None.

    Returns:
        ``(spec, overrides)``, ``overrides`` being ``{field: (recorded value, given value)}`` for
        each flag given that differs from what the checkpoint recorded.
    """
    given = {name: value for name, value in as_spec_values(given).items() if value is not None}
    recorded = recorded or {}
    arch = given.get("arch", recorded.get("arch", RunSpec.arch))
    spec = dataclasses.replace(architecture_defaults(arch), **{**recorded, **given})
    overrides = {name: (recorded[name], value) for name, value in given.items()
                 if name in recorded and recorded[name] != value}
    return spec, overrides


def build_model(spec):
    """The network ``spec`` describes (architecture, binarizers, classes, step), freshly initialised;
    ``model.spec`` records ``spec``."""
    model = get_architecture(spec.arch).build(spec.num_classes, spec.binary_weights)
    set_binarizers(model, spec.act_binarizer, spec.weight_binarizer)
    model.spec = spec
    return model
