"""A plugin of the tests: the published binarizers under the name ``counted``, counting their calls.

A run given ``--act_binarizer counted`` (or ``--weight_binarizer counted``) computes what the
defaults compute, and writes at exit, to the JSON file that ``BINARIZER_COUNTS`` names, how many
times each binarizer ran with gradients (training) and without (validation): proof that the
binarizer a run records is the one that ran.
"""
import atexit
import json
import os

import torch

from models.binarize import binarize_activation, binarize_weight
from models.registry import register_act_binarizer, register_weight_binarizer

CALLS = {kind: {"train": 0, "eval": 0} for kind in ("act", "weight")}


def count(kind):
    CALLS[kind]["train" if torch.is_grad_enabled() else "eval"] += 1


@register_act_binarizer("counted")
def counted_activation(x):
    count("act")
    return binarize_activation(x)


@register_weight_binarizer("counted")
def counted_weight(weight):
    count("weight")
    return binarize_weight(weight)


@atexit.register
def write_counts():
    if "BINARIZER_COUNTS" in os.environ:
        with open(os.environ["BINARIZER_COUNTS"], "w") as f:
            json.dump(CALLS, f)
