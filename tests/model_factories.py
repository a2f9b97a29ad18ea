"""A user's own model factories, named in conf as train.model.factory: tests.model_factories:linear."""

from __future__ import annotations

import math

import torch
from torch import nn

from dlpipe.train.models import build_mlp


def linear(in_shape, num_classes, **_):
    """Multinomial logistic regression."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(in_shape), num_classes))


class TrainsIn(nn.Module):
    """The default MLP, refusing to take a training step whose logits are not of dtype `dtype`: a run with
    train.mixed_precision=bf16 that trained in fp32 (autocast not entered on the rank) fails."""

    def __init__(self, net: nn.Module, dtype: str):
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training and torch.is_grad_enabled() and str(out.dtype) != f"torch.{self.dtype}":
            raise RuntimeError(f"a training step ran in {out.dtype}, not torch.{self.dtype}: autocast is off")
        return out


def mlp_trained_in(in_shape, num_classes, dtype: str = "bfloat16", **kwargs):
    """build_mlp's model wrapped in TrainsIn(dtype) (train.model.params.dtype)."""
    return TrainsIn(build_mlp(in_shape, num_classes, **kwargs), dtype)
