"""What a model learns: class probabilities (classification) or a value (regression).

The places where the two differ (the label's type, the loss, the per-epoch metric, the served form of the
model, the metrics of the test split) ask this module instead of testing `dataset.task` themselves.
Regression targets are standardized with the training split's mean and std while training; the served
model undoes it, so predictions are in the label's own units.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from dlpipe.model.task import REGRESSION, epoch_metric

if TYPE_CHECKING:
    from dlpipe.data.stats import FittedStats


class Objective:
    """Loss and per-epoch metric sums of one batch, on the device (summed, read once per epoch)."""

    def __init__(self, task: str, label_mean: float = 0.0, label_std: float = 1.0):
        self.task, self.mean, self.std = task, float(label_mean), float(label_std)
        self.metric = epoch_metric(task)
        self._ce = nn.CrossEntropyLoss(reduction="sum")

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed: cross-entropy of logits, or squared error of standardized targets."""
        if self.task == REGRESSION:
            return ((out.reshape(-1) - (y - self.mean) / self.std) ** 2).sum()
        return self._ce(out, y)

    def distilled(
        self, hard: torch.Tensor, out: torch.Tensor, target: torch.Tensor, temperature: float, alpha: float
    ) -> torch.Tensor:
        """Summed: knowledge distillation's loss, alpha x the soft-target loss + (1 - alpha) x hard (the labels'
        loss). Soft targets: the KL divergence between the teacher's and the student's outputs softened by the
        temperature, times its square so the gradients keep their scale (Hinton et al. 2015); regression: the
        squared distance to the teacher's (standardized) value."""
        if self.task == REGRESSION:
            soft = ((out.reshape(-1) - target.reshape(-1)) ** 2).sum()
        else:
            t = temperature
            student, teacher = nn.functional.log_softmax(out / t, 1), nn.functional.log_softmax(target / t, 1)
            soft = nn.functional.kl_div(student, teacher, reduction="sum", log_target=True) * t * t
        return alpha * soft + (1 - alpha) * hard

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Summed: correct predictions, or absolute errors in label units."""
        if self.task == REGRESSION:
            return (out.reshape(-1).detach() * self.std + self.mean - y).abs().sum()
        return (out.argmax(1) == y).sum()

    def record(self, prefix: str, loss_sum: float, hits_sum: float, rows: float) -> dict[str, float]:
        out = {f"{prefix}_loss": loss_sum / rows, f"{prefix}_{self.metric}": hits_sum / rows}
        if self.task == REGRESSION:
            out[f"{prefix}_rmse"] = math.sqrt(loss_sum / rows) * self.std
        return out


class Rescaled(nn.Module):
    """The served form of a regressor: a standardized output -> the label's units, shape (n,)."""

    def __init__(self, model: nn.Module, mean: float, std: float):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).reshape(-1) * self.std + self.mean


def served(model: nn.Module, stats: FittedStats) -> nn.Module:
    """What gets logged and scored: probabilities for a classifier, the value for a regressor."""
    from dlpipe.train.models import with_probabilities

    if stats.is_regression:
        return Rescaled(model, stats.label_mean, stats.label_std)
    return with_probabilities(model)
