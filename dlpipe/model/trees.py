"""A gradient-boosted tree model behind the network's interface, so that every scorer takes either.

The tree baseline (dlpipe.model.baseline) is an XGBoost Booster. Wrapped in `BoosterModule` it is called
like the network: float32 features in, probabilities in class order (or a regressor's value) out. The
raw-record model, the batch scorer (udfs/score.py), the promotion gate and serving then need no second
path. Light to import: xgboost is loaded only when a tree model is.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

BOOSTER_FILE = "booster.json"  # XGBoost's own portable format (no pickle)


class BoosterModule(torch.nn.Module):
    """An XGBoost Booster as a torch module. task: "classification" or "regression"; outputs: the classes
    (a binary booster answers P(class 1) alone; it is widened to both columns) or 1."""

    def __init__(self, booster, task: str, outputs: int):
        super().__init__()
        self.booster = booster
        self.task = task
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = int(os.environ.get("DLPIPE_SCORING_THREADS", "1"))  # as the network's scorer: one per task
        self.booster.set_param({"nthread": threads})
        out = np.asarray(self.booster.inplace_predict(x.detach().cpu().numpy()), dtype=np.float32)
        if self.task == "regression":
            out = out.reshape(-1, 1)
        elif out.ndim == 1:  # binary:logistic
            out = np.stack([1.0 - out, out], axis=1)
        return torch.from_numpy(np.ascontiguousarray(out))

    def save(self, folder: Path) -> Path:
        path = Path(folder) / BOOSTER_FILE
        self.booster.save_model(str(path))
        return path

    @classmethod
    def load(cls, path: str | Path, task: str, outputs: int) -> BoosterModule:
        import xgboost

        booster = xgboost.Booster()
        booster.load_model(str(path))
        return cls(booster, task, outputs)

    def size_bytes(self) -> int:
        return len(self.booster.save_raw("json"))
