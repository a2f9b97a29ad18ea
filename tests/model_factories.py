"""A user's own model factory, named in conf as train.model.factory: tests.model_factories:linear."""

from __future__ import annotations

import math

from torch import nn


def linear(in_shape, num_classes, **_):
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))
