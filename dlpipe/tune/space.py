"""The search space of the tune stage: conf's ranges turned into a trial's settings, and settings laid over
the training config.

Values are in the config's own units: `train.batch_size` is one rank's batch and `train.lr` one rank's
learning rate, as the train stage reads them. A trial trains alone, so it runs the equivalent single rank
(`single_rank`): the batch of all ranks together and the learning rate they reach after warm-up. What the
best trial used is then what train runs with, unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

from dlpipe.config import ParamRange, TrainConfig


def suggest(trial: Any, space: dict[str, ParamRange]) -> dict[str, Any]:
    """A value for every key of the space, asked of an Optuna trial (its sampler decides)."""
    values: dict[str, Any] = {}
    for key, r in space.items():
        if r.layers is not None and r.width is not None:
            depth = trial.suggest_int(f"{key}.layers", r.layers[0], r.layers[1])
            values[key] = [trial.suggest_int(f"{key}.{i}", r.width[0], r.width[1], log=True) for i in range(depth)]
        elif r.choices is not None:
            values[key] = trial.suggest_categorical(key, r.choices)
        elif r.is_int:
            values[key] = trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            values[key] = trial.suggest_float(key, float(r.low), float(r.high), step=r.step, log=r.log)
    return values


def values_of(params: dict[str, Any], space: dict[str, ParamRange]) -> dict[str, Any]:
    """The settings an Optuna trial's recorded params stand for (the inverse of `suggest`'s naming)."""
    values: dict[str, Any] = {}
    for key, r in space.items():
        if r.layers is not None:
            values[key] = [params[f"{key}.{i}"] for i in range(params[f"{key}.layers"])]
        elif key in params:
            values[key] = params[key]
    return values


def apply(train: TrainConfig, values: dict[str, Any]) -> TrainConfig:
    """train with each `train.*` key of values set (validated like conf: a bad value fails here)."""
    data = copy.deepcopy(train.model_dump(mode="json"))
    for key, value in values.items():
        parts = key.split(".")[1:]  # below `train`
        if parts[:2] == ["model", "params"]:
            data["model"].setdefault("params", {})[parts[2]] = value
            continue
        node = data
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return TrainConfig.model_validate(data)


def single_rank(train: TrainConfig, ranks: int) -> TrainConfig:
    """The one-rank training equivalent to `train` on `ranks` ranks: their batches together and the learning
    rate they reach after warm-up (the gradients of all ranks are averaged, so it is the same descent)."""
    return train.model_copy(update={"batch_size": train.batch_size * ranks, "lr": train.lr * ranks})
