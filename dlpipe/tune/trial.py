"""Executor side: one tuning trial, a single-rank training inside one Spark task.

The trial reads the train split, scores every epoch on the validation split (never the test split) and
stops early when Optuna's median pruner, shown the trials that had finished when this one started, says
it is doing worse than they did at the same epoch. The driver records the curve in the study and in MLflow;
nothing here touches Spark or MLflow (tests/test_layers.py holds it to that).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from dlpipe.runtime import tune_gc
from dlpipe.train.comm import SoloComm
from dlpipe.train.worker import TrainSpec, epoch_record, pick_device, set_up, train_epoch, validate


@dataclass(frozen=True)
class TrialSpec:
    """What a trial's task needs: its training (in single-rank form) and what pruning compares it with."""

    number: int
    train: TrainSpec
    finished: tuple[Any, ...] = ()  # optuna FrozenTrials that had completed when this trial was asked
    prune_warmup_epochs: int = 3
    prune_min_trials: int = 3


def _pruner_trial(spec: TrialSpec) -> Any:
    """A stand-in for this trial in an in-memory study holding the finished trials: its should_prune() is
    Optuna's median rule against them (no shared storage needed between executors and the driver)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=spec.prune_min_trials, n_warmup_steps=spec.prune_warmup_epochs
    )
    study = optuna.create_study(direction="minimize", pruner=pruner)
    study.add_trials(list(spec.finished))
    return study.ask()


def run_trial(spec: TrialSpec) -> dict[str, Any]:
    """Train until the epochs run out, early stopping, or pruning; return the curve and the best
    validation loss (the value the study minimizes)."""
    tune_gc()
    t = spec.train
    started = time.time()
    run, state = set_up(t, SoloComm(pick_device(t)))  # the ranks' own set-up: no checkpoints, no live tracking
    pruning = _pruner_trial(spec)
    pruned_at = None
    for epoch in range(1, t.train.epochs + 1):
        rows, loss_sum, correct, seconds = train_epoch(run, epoch)
        v_rows, v_loss, v_correct = validate(run, epoch)
        record = epoch_record(run, epoch, [rows, loss_sum, correct, v_rows, v_loss, v_correct], seconds)
        state = state.after_epoch(record, t.train.early_stopping.min_delta, lambda: {})
        if not math.isfinite(record["val_loss"]):
            pruned_at = epoch  # a diverged trial: nothing more to learn from it
            break
        pruning.report(record["val_loss"], epoch)
        if pruning.should_prune():
            pruned_at = epoch
            break
        if state.should_stop(t.train.early_stopping.patience):
            break
    run.log.info(
        "trial %d: %s after %d epochs, best val_loss %.4f (%.1fs)",
        spec.number,
        f"pruned at epoch {pruned_at}" if pruned_at else "done",
        state.epoch,
        state.best_loss,
        time.time() - started,
    )
    return {
        "number": spec.number,
        "history": list(state.history),
        "best_val_loss": state.best_loss,
        "pruned_at": pruned_at,
        "seconds": time.time() - started,
    }
