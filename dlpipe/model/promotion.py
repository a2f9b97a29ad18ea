"""The quality gate: the candidate takes the `production` alias only when it beats the production model on
the same test rows by evaluate.promote_margin, or when there is no production model yet; with
evaluate.require_beat_baseline, only when it also beats the tree baseline (dlpipe.model.baseline). The decision,
the reason and both scores go to MLflow (the evaluate run, and tags on the model versions)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from dlpipe.model.names import PRODUCTION
from dlpipe.model.task import LOWER_IS_BETTER

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    metric: str
    candidate: float
    production: float | None


def decide(
    metric: str, candidate: float, production: float | None, margin: float, baseline: float | None = None
) -> Decision:
    """baseline: the tree baseline's value of metric, when the gate requires the candidate to beat it."""
    if baseline is not None:
        gain = baseline - candidate if metric in LOWER_IS_BETTER else candidate - baseline
        if gain <= 0:
            why = f"{metric} {candidate:.4f} does not beat the tree baseline's {baseline:.4f}"
            return Decision(False, why, metric, candidate, production)
    if production is None:
        return Decision(True, "no production model yet", metric, candidate, None)
    gain = production - candidate if metric in LOWER_IS_BETTER else candidate - production
    verdict = gain >= margin
    reason = f"{metric} {'better' if gain >= 0 else 'worse'} by {abs(gain):.4f}; margin {margin}"
    return Decision(verdict, reason, metric, candidate, production)


def production_version(name: str):
    """The model version under @production, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, PRODUCTION)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise


def record(name: str, candidate_version: str, decision: Decision, production: str | None) -> dict[str, float]:
    """Tag the active run and the candidate version with the decision, move the alias if promoted, and
    return the scores as the stage's metrics."""
    import mlflow

    client = mlflow.MlflowClient()
    metrics = {f"candidate_{decision.metric}": decision.candidate, "promoted": float(decision.promote)}
    if decision.production is not None:
        metrics[f"production_{decision.metric}"] = decision.production
    mlflow.set_tags(
        {
            "dlpipe.promotion": "promoted" if decision.promote else "kept production",
            "dlpipe.promotion_reason": decision.reason,
            "dlpipe.production_version_before": production or "none",
        }
    )
    client.set_model_version_tag(name, candidate_version, "dlpipe.promotion", decision.reason)
    if decision.promote:
        client.set_registered_model_alias(name, PRODUCTION, candidate_version)
        log.info("evaluate: %s version %s is now @%s (%s)", name, candidate_version, PRODUCTION, decision.reason)
    elif production is None:
        log.info(
            "evaluate: %s has no @%s; version %s is not promoted (%s)",
            name,
            PRODUCTION,
            candidate_version,
            decision.reason,
        )
    else:
        log.info("evaluate: @%s stays %s version %s (%s)", PRODUCTION, name, production, decision.reason)
    return metrics
