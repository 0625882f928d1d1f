"""The recipe's optimizer and learning-rate schedule."""
import torch

from . import recipe


def decayed(name, parameter):
    """The published rule for the weight-decayed group: every 4-D parameter, which is every
    convolution weight and also the (1, C, 1, 1) learnable shifts of RSign and RPReLU, and anything
    named ``conv``. BatchNorm, PReLU slopes and fc are not decayed."""
    return parameter.dim() == 4 or "conv" in name


def build_optimizer(model, learning_rate, weight_decay, fused=False, name="adam"):
    """Adam (or SGD with momentum 0.9) with L2 weight decay on the ``decayed`` group.

    Group 0: no decay. Group 1: ``decayed`` parameters, with ``weight_decay``. ``fused=True`` uses
    PyTorch's fused kernel (faster, rounds slightly differently).
    """
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not decayed(n, p)]},
              {"params": [p for n, p in named if decayed(n, p)], "weight_decay": weight_decay}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=recipe.SGD_MOMENTUM, fused=fused or None)
    return torch.optim.Adam(groups, lr=learning_rate, betas=recipe.ADAM_BETAS, fused=fused or None)


def learning_rate_factor(steps, epochs):
    """The recipe's schedule, written once: the share of the base learning rate after ``steps``
    scheduler steps, ``1 - steps / epochs`` (linear to zero). The scheduler and a resume with a
    changed schedule both use it."""
    return 1.0 - steps / epochs


def build_scheduler(optimizer, epochs):
    """``lr * learning_rate_factor(e, epochs)``, stepped at the start of every epoch as the
    published code does, so 0-based epoch ``e`` trains at ``lr * (1 - (e + 1) / epochs)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: learning_rate_factor(e, epochs))
