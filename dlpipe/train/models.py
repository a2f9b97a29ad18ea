"""Model factories. Built only from torch's own layers, so a logged model loads wherever torch does."""

from __future__ import annotations

from torch import nn


def build_mlp(in_dim: int, num_classes: int, hidden: list[int]) -> nn.Sequential:
    """A plain MLP producing logits."""
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def with_probabilities(model: nn.Module) -> nn.Sequential:
    """The served form of a classifier: logits -> class probabilities."""
    return nn.Sequential(model, nn.Softmax(dim=1))
