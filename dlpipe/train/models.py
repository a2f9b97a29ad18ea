"""Model factories. Built only from torch's own layers, so a logged model loads wherever torch does."""

from __future__ import annotations

import math

from torch import nn


def build_mlp(in_shape: tuple[int, ...], num_classes: int, hidden: list[int]) -> nn.Sequential:
    """A plain MLP producing logits; inputs of any shape are flattened first."""
    layers: list[nn.Module] = [nn.Flatten()]
    prev = int(math.prod(in_shape))
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def with_probabilities(model: nn.Module) -> nn.Sequential:
    """The served form of a classifier: logits -> class probabilities."""
    return nn.Sequential(model, nn.Softmax(dim=1))
