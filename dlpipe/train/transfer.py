"""Transfer learning (driver side): the weights a training starts from when `train.init_from` names a model.

The parent is read the way scoring reads any registered model (its network, on the CPU); its parameters are
matched to the new model's by name. A registered model serves probabilities, so its network wraps the
factory's model (`0.1.weight` for the MLP's `1.weight`): the prefix is found, not assumed. Every matching
tensor is taken; the head (the model's last weight and bias) starts fresh when its shape differs (other
classes); any other difference means another architecture and is an error naming the parameter.
"""

from __future__ import annotations

import io
import logging

import torch
from torch import nn

from dlpipe.tracking import ModelRef

log = logging.getLogger(__name__)


def parent_weights(ref: ModelRef) -> dict[str, torch.Tensor]:
    """The parameters of the model ref resolves to (train's plan resolved train.init_from), on the CPU."""
    from dlpipe.model.rawmodel import network_of

    network = network_of(ref.download_uri)
    return {k: v.detach().cpu() for k, v in network.state_dict().items()}


def _prefix(parent: dict[str, torch.Tensor], names: list[str]) -> str:
    """The prefix that turns the most of names into parent keys ('' or e.g. '0.')."""
    candidates = {""}
    for key in parent:
        for name in names:
            if key.endswith("." + name):
                candidates.add(key[: -len(name)])
    return max(sorted(candidates), key=lambda p: sum(p + n in parent for n in names))


def warm_start(model: nn.Module, parent: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the parent's tensors by the model's own names, the names that start fresh): what a rank loads with
    load_state_dict(strict=False). Raises when the parent is another architecture."""
    own = model.state_dict()
    names = list(own)
    prefix = _prefix(parent, names)
    head = set(names[-2:])  # the last layer's weight and bias
    taken, fresh, missing = {}, [], []
    for name in names:
        tensor = parent.get(prefix + name)
        if tensor is None:
            missing.append(name)
        elif tensor.shape == own[name].shape:
            taken[name] = tensor
        elif name in head:
            fresh.append(name)  # another number of classes (or outputs): a new head
        else:
            raise ValueError(
                f"train.init_from: parameter {name} is {tuple(tensor.shape)} in the parent model but "
                f"{tuple(own[name].shape)} here: the architectures differ (train.model must match the parent's)"
            )
    if missing or not taken:
        raise ValueError(
            f"train.init_from: the parent model has no parameter named like {missing[:4] or names[:4]} "
            f"(it has {list(parent)[:6]}): the architectures differ"
        )
    return taken, fresh


def check_freeze(model: nn.Module, freeze: list[str]) -> None:
    """Every train.freeze entry must name some parameter (a typo would silently train everything)."""
    params = [n for n, _ in model.named_parameters()]
    for entry in freeze:
        if not any(n == entry or n.startswith(entry) for n in params):
            raise ValueError(f"train.freeze: '{entry}' names no parameter; the model's are {params}")


def serialized(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()
