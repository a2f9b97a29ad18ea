"""Rank 0's live view of training in MLflow: per-epoch metrics and the learning curve, as each epoch ends.

Rank 0 writes straight to the stage's MLflow run (the driver passes its tracking URI, run id and, for an
authenticated server, its credentials), so the curves fill in while the job runs. Where the store cannot be
reached from an executor (a SQLite file on the driver's disk, seen from another machine), the rank says so
once and carries on; the driver then logs the epochs that were not logged live, from the history the ranks
return.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from dlpipe.tracking import Credentials, credentials_env

SKIP = ("epoch",)


def learning_curve(history: list[dict]):
    """Loss and accuracy (regression: mean absolute error) per epoch, train and validation (a Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    regression = "val_mae" in history[0]
    metric = "mae" if regression else "accuracy"
    ax1.set(xlabel="epoch", ylabel="squared error (standardized)" if regression else "cross-entropy", title="loss")
    ax2.plot(epochs, [h[f"train_{metric}"] for h in history], marker="o", label="train")
    ax2.plot(epochs, [h[f"val_{metric}"] for h in history], marker="o", label="validation")
    ax2.set(xlabel="epoch", ylabel=metric, title="mean absolute error" if regression else "accuracy")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def logged_epochs(client, run_id: str) -> set[int]:
    """The epochs whose metrics the run holds (by the steps of val_loss, which every epoch logs)."""
    return {m.step for m in client.get_metric_history(run_id, "val_loss")}


def epoch_metrics(record: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in record.items() if k not in SKIP}


class LiveTracker:
    """MLflow logging from rank 0; every call is best effort (training never fails for tracking)."""

    def __init__(
        self,
        tracking_uri: str | None,
        run_id: str | None,
        log: logging.Logger,
        credentials: Credentials | None = None,
    ):
        self._run_id, self._log = run_id, log
        self._credentials = credentials  # used where this executor's environment has none of its own
        self._client = None
        self.logged: set[int] = set()  # epochs in the run already (a retried stage must not log twice)
        if tracking_uri and run_id:
            from mlflow import MlflowClient

            try:
                self._client = MlflowClient(tracking_uri)
                with credentials_env(self._credentials):
                    self.logged = logged_epochs(self._client, run_id)
            except Exception as exc:  # the store is on another machine's disk, or down, or refuses us
                self._off(f"opening {re.sub(r'//[^/@]*@', '//***@', tracking_uri)}", exc)

    @property
    def active(self) -> bool:
        return self._client is not None

    def _off(self, what: str, exc: Exception) -> None:
        self._log.warning(
            "live MLflow logging off (%s failed: %s); the driver logs the metrics after training",
            what,
            str(exc).splitlines()[0][:200],
        )
        self._client = None

    def log_epoch(self, record: dict[str, Any], history: list[dict]) -> bool:
        """Log one epoch's metrics (step = epoch) and redraw the curve; True when the metrics landed."""
        if self._client is None:
            return False
        if int(record["epoch"]) in self.logged:
            return True
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, int(record["epoch"])) for k, v in epoch_metrics(record).items()]
        try:
            with credentials_env(self._credentials):
                self._client.log_batch(self._run_id, metrics=metrics)
        except Exception as exc:  # any store error: a tracking outage must not kill training
            self._off("log_batch", exc)
            return False
        self.logged.add(int(record["epoch"]))
        try:
            import matplotlib.pyplot as plt

            fig = learning_curve(history)
            with credentials_env(self._credentials):
                self._client.log_figure(self._run_id, fig, "learning_curve.png")
            plt.close(fig)
        except Exception as exc:  # the artifact store may be unreachable where the metrics store is not
            self._log.warning("learning curve not logged live: %s", str(exc).splitlines()[0][:200])
        return True
