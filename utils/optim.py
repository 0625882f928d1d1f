"""The recipes' optimizers and learning-rate schedules (utils/recipe.py)."""
import math

import torch

from . import recipe


def decayed(name, parameter):
    """AdamBNN's rule for the weight-decayed group, as published: every 4-D parameter, which is every
    convolution weight and also the (1, C, 1, 1) learnable shifts of RSign and RPReLU, and anything
    named ``conv``. BatchNorm, PReLU slopes and fc are not decayed."""
    return parameter.dim() == 4 or "conv" in name


def bnext_conv_group(name, parameter):
    """BNext's rule for its lightly decayed group: every 4-D parameter and those of ``binary_conv``."""
    return parameter.dim() == 4 or "binary_conv" in name


def parameter_groups(model, weight_decay, groups="adambnn"):
    """The recipe's two parameter groups; group 1 decays by ``weight_decay`` (``--weight_decay``).

    ``adambnn``: group 0 the parameters not ``decayed``, without decay; group 1 the ``decayed``.
    ``bnext``: group 0 the ``bnext_conv_group``, decayed by recipe.BNEXT_CONV_WEIGHT_DECAY; group 1
    the others.
    """
    named = list(model.named_parameters())
    if groups == "bnext":
        return [{"params": [p for n, p in named if bnext_conv_group(n, p)],
                 "weight_decay": recipe.BNEXT_CONV_WEIGHT_DECAY},
                {"params": [p for n, p in named if not bnext_conv_group(n, p)], "weight_decay": weight_decay}]
    return [{"params": [p for n, p in named if not decayed(n, p)]},
            {"params": [p for n, p in named if decayed(n, p)], "weight_decay": weight_decay}]


def build_optimizer(model, learning_rate, weight_decay, fused=False, name="adam", groups="adambnn"):
    """Adam (L2 decay), AdamW (decoupled decay) or SGD with momentum 0.9, over ``parameter_groups``.

    ``fused=True`` uses PyTorch's fused kernel (faster, rounds slightly differently).
    """
    groups = parameter_groups(model, weight_decay, groups)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=recipe.SGD_MOMENTUM, fused=fused or None)
    if name == "adamw":  # a group without a decay of its own has none, as with Adam
        return torch.optim.AdamW(groups, lr=learning_rate, betas=recipe.ADAM_BETAS, weight_decay=0.0,
                                 fused=fused or None)
    return torch.optim.Adam(groups, lr=learning_rate, betas=recipe.ADAM_BETAS, fused=fused or None)


def learning_rate_factor(steps, epochs, schedule="linear", base_rate=None):
    """The recipes' schedules, written once: the share of the base learning rate ``base_rate`` after
    ``steps`` scheduler steps. The scheduler and a resume with a changed schedule both use it.

    The scheduler is stepped at the start of every epoch, so 0-based epoch ``e`` trains after
    ``e + 1`` steps.

    ``linear`` (AdamBNN): ``1 - steps / epochs``, linear to zero.
    ``warmup_cosine`` (BNext; timm's CosineLRScheduler with ``warmup_prefix``): epoch ``e`` trains at
    ``start + e * (base - start) / 5`` for ``e < 5`` (``start`` 1e-5), then at
    ``final + (base - final) / 2 * (1 + cos(pi * (e - 5) / epochs))`` (``final`` 1e-7).
    """
    if schedule == "linear":
        return 1.0 - steps / epochs
    epoch = max(steps - 1, 0)  # steps is 0 only before the first epoch
    start, final, warmup = recipe.BNEXT_WARMUP_START_RATE, recipe.BNEXT_FINAL_RATE, recipe.BNEXT_WARMUP_EPOCHS
    if epoch < warmup:
        rate = start + epoch * ((base_rate - start) / warmup)
    else:
        rate = final + 0.5 * (base_rate - final) * (1 + math.cos(math.pi * (epoch - warmup) / epochs))
    return rate / base_rate


def build_scheduler(optimizer, epochs, schedule="linear", base_rate=None):
    """``lr * learning_rate_factor(e, epochs, schedule, base_rate)``, stepped at the start of every
    epoch as the published code does; for ``linear`` 0-based epoch ``e`` trains at
    ``lr * (1 - (e + 1) / epochs)``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: learning_rate_factor(e, epochs, schedule, base_rate))
