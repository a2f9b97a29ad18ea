"""Model factories, chosen and sized by `train.model` in conf/.

A factory is `f(input_shape, num_classes, **params) -> nn.Module` producing logits. `mlp` and `cnn` are
built in; `train.model.factory: package.module:function` names your own (it must be importable on the
executors). Logged models are torch.export programs, so loading one later needs torch, not this code.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn


def build_mlp(
    in_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (64, 64), dropout: float = 0.0, **_: Any
) -> nn.Sequential:
    """A plain MLP producing logits; inputs of any shape are flattened first."""
    layers: list[nn.Module] = [nn.Flatten()]
    prev = int(math.prod(in_shape))
    for width in hidden:
        layers += [nn.Linear(prev, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        prev = width
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def build_cnn(
    in_shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (16, 32),
    hidden: Sequence[int] = (64,),
    dropout: float = 0.0,
    **_: Any,
) -> nn.Sequential:
    """A small CNN for (C, H, W) images: 3x3 conv + ReLU (+ 2x2 max-pool while the map is >= 4 wide),
    then dense layers."""
    if len(in_shape) != 3:
        raise ValueError(f"the cnn model needs (channels, height, width) inputs, got shape {tuple(in_shape)}")
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    return nn.Sequential(*layers, build_mlp((c, h, w), num_classes, hidden, dropout))


FACTORIES: dict[str, Callable[..., nn.Module]] = {"mlp": build_mlp, "cnn": build_cnn}


def resolve_factory(name: str, in_shape: Sequence[int]) -> Callable[..., nn.Module]:
    if name == "auto":
        return build_cnn if len(in_shape) == 3 else build_mlp
    if name in FACTORIES:
        return FACTORIES[name]
    module, sep, attr = name.partition(":") if ":" in name else name.rpartition(".")
    if not module or not attr:
        raise ValueError(f"train.model.factory '{name}': use mlp, cnn, auto or package.module:function")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"train.model.factory '{name}' cannot be imported: {exc}") from None


def build_model(model: dict[str, Any], in_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The model `train.model` describes (a plain dict, so it travels to executors as is)."""
    factory = resolve_factory(model["factory"], in_shape)
    kwargs = {k: model[k] for k in ("hidden", "channels", "dropout") if k in model}
    return factory(tuple(in_shape), num_classes, **kwargs, **model.get("params", {}))


def with_probabilities(model: nn.Module) -> nn.Sequential:
    """The served form of a classifier: logits -> class probabilities."""
    return nn.Sequential(model, nn.Softmax(dim=1))
