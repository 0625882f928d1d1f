"""The recipe's optimizer and learning-rate schedule."""
import torch
import torch.nn as nn

from . import recipe


def build_optimizer(model, learning_rate, weight_decay, fused=False, name="adam"):
    """Adam (or SGD with momentum 0.9) with L2 weight decay on the convolution weights only.

    Group 0 (no decay): BatchNorm, learnable biases, PReLU slopes, fc. Group 1: every conv weight.
    ``fused=True`` uses PyTorch's fused kernel (faster, rounds slightly differently).
    """
    conv_weights = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    conv_ids = {id(p) for p in conv_weights}
    others = [p for p in model.parameters() if id(p) not in conv_ids]
    groups = [{"params": others}, {"params": conv_weights, "weight_decay": weight_decay}]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=recipe.SGD_MOMENTUM, fused=fused or None)
    return torch.optim.Adam(groups, lr=learning_rate, betas=recipe.ADAM_BETAS, fused=fused or None)


def build_scheduler(optimizer, epochs):
    """``lr * (1 - e / epochs)``, stepped at the start of every epoch as the published code does,
    so 0-based epoch ``e`` trains at ``lr * (1 - (e + 1) / epochs)``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0 - e / epochs)
