"""Driver side: the compress stage's trained variants, made through train's own launcher.

- **prune**: the candidate with compress.prune.sparsity of each hidden layer's units removed
  (dlpipe.model.prune), then fine-tuned on the train split from the pruned weights.
- **distill**: a smaller student MLP (compress.distill.hidden) trained from scratch on the train split, on
  the candidate's soft targets blended with the labels (Objective.distilled); every rank holds the teacher.

Both train like the train stage does (Horovod ranks in a barrier stage, or TorchDistributor, as
train.launcher says; train.num_proc ranks; early stopping on the val split keeping the best epoch), with no
checkpoints and no live MLflow logging: their curves are logged by the compress stage.
"""

from __future__ import annotations

import dataclasses
import io
import logging

import numpy as np
import torch
from pyspark.sql import SparkSession
from torch import nn

from dlpipe.config import Config
from dlpipe.data.stats import FittedStats
from dlpipe.model import prune
from dlpipe.train.models import build_mlp
from dlpipe.train.transfer import serialized
from dlpipe.train.worker import Teacher, TrainSpec

log = logging.getLogger(__name__)


def candidate_network(network: nn.Module, stats: FittedStats, example: np.ndarray) -> prune.Dense:
    """The dense layers of the candidate's registered network (its served form), checked: the built-in mlp
    rebuilt from them must answer example as the registered network does, or the candidate is not a plain
    ReLU MLP and cannot be pruned or distilled from here."""
    from dlpipe.model.objective import served

    layers = prune.dense_layers(network.state_dict())
    rebuilt = served(prune.mlp_of(layers, stats.feature_shape), stats).eval()
    x = torch.from_numpy(example)
    with torch.no_grad():
        ok = torch.allclose(rebuilt(x), network(x), atol=1e-4)
    if not ok:
        raise ValueError(
            "compress.prune / compress.distill: the candidate is not a plain ReLU MLP of dense layers (rebuilt as "
            "the built-in mlp it answers differently); they need train.model.factory mlp"
        )
    return layers


def pruned(spark: SparkSession, cfg: Config, stats: FittedStats, teacher: prune.Dense) -> tuple[nn.Module, list]:
    """The pruned candidate, fine-tuned: (the network, its fine-tuning history)."""
    p = cfg.compress.prune
    layers = prune.prune_layers(teacher, p.sparsity)
    net = prune.mlp_of(layers, stats.feature_shape)
    log.info(
        "compress: pruned %.0f%% of each hidden layer's units: widths %s -> %s",
        100 * p.sparsity,
        prune.widths(teacher),
        prune.widths(layers),
    )
    if p.finetune_epochs == 0:
        return net.eval(), []
    spec = _spec(spark, cfg, stats, prune.widths(layers), p.finetune_epochs, p.finetune_lr or cfg.train.lr / 3)
    spec = dataclasses.replace(spec, init_state=serialized(net.state_dict()))
    return _train(spark, cfg, spec, net, "prune")


def distilled(spark: SparkSession, cfg: Config, stats: FittedStats, teacher: prune.Dense) -> tuple[nn.Module, list]:
    """A student of compress.distill.hidden widths trained on the teacher's soft targets: (it, its history)."""
    d = cfg.compress.distill
    spec = _spec(spark, cfg, stats, list(d.hidden), d.epochs or cfg.train.epochs, cfg.train.lr)
    state = serialized(prune.mlp_of(teacher, stats.feature_shape).state_dict())
    spec = dataclasses.replace(
        spec, teacher=Teacher({"factory": "mlp", "hidden": prune.widths(teacher)}, state, d.temperature, d.alpha)
    )
    log.info("compress: distilling widths %s into a student of widths %s", prune.widths(teacher), list(d.hidden))
    student = build_mlp(stats.feature_shape, stats.outputs, hidden=list(d.hidden))  # receives the ranks' weights
    return _train(spark, cfg, spec, student, "distill")


def _spec(spark: SparkSession, cfg: Config, stats: FittedStats, widths: list[int], epochs: int, lr: float) -> TrainSpec:
    """The ranks' spec for a built-in mlp of these widths: train's settings otherwise, without what belongs to
    the candidate's own training (a warm start, frozen layers, resuming, injected faults), no checkpoints."""
    from dlpipe.train.launcher import tasks_have_gpus
    from dlpipe.train.stage import make_spec

    model = cfg.train.model.model_copy(update={"factory": "mlp", "hidden": widths, "dropout": 0.0, "params": {}})
    train = cfg.train.model_copy(
        update={
            "model": model,
            "epochs": epochs,
            "lr": lr,
            "init_from": None,
            "freeze": [],
            "resume": False,
            "fault_injection": None,
        }
    )
    return make_spec(cfg.model_copy(update={"train": train}), stats, "", tasks_have_gpus(spark.sparkContext))


def _train(spark: SparkSession, cfg: Config, spec: TrainSpec, net: nn.Module, name: str) -> tuple[nn.Module, list]:
    """Launch the ranks on spec; net (of spec's architecture) receives the best epoch's weights."""
    from dlpipe.train.stage import launch

    log.info("compress: training the %s variant: %d epochs on %d ranks", name, spec.train.epochs, spec.train.num_proc)
    result = launch(spark, cfg.model_copy(update={"train": spec.train}), spec)
    net.load_state_dict(torch.load(io.BytesIO(result["state_dict"])))
    return net.eval(), result["history"]
