"""The stage contract: what a stage declares, and the one runner that does everything else.

A stage says what it reads (inputs and their fingerprints), what it writes (folders, by role), what goes
into its fingerprint and when earlier output may be reused; its `compute` writes into temporary folders
and returns metrics. The runner does the rest, the same way for every stage: the skip check, the atomic
commit of every output folder (all or none), the row accounting (rows in = the sum of rows out, checked
before anything is committed), the `_dlpipe_meta.json` of each output, and the lineage on the MLflow run.
`dlpipe.pipeline.run_stage` adds the run lock and the MLflow child run around it.

Adding a stage is a subclass with its own logic, registered in `dlpipe.pipeline.STAGES`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pyspark.sql import SparkSession

from dlpipe.config import Config
from dlpipe.storage import HadoopFS, atomic_output, lineage

log = logging.getLogger(__name__)


class AccountingError(RuntimeError):
    """Rows went missing or appeared between a stage's input and its outputs; nothing was committed."""


@dataclass(frozen=True)
class Plan:
    """What a stage will read and write, decided before any work is done."""

    fingerprint: str
    inputs: dict[str, str]  # input URI -> its fingerprint
    outputs: dict[str, str] = field(default_factory=dict)  # role -> folder, committed atomically together
    lineage_outputs: tuple[str, ...] = ()  # what lineage names beside the folders (e.g. a model version)
    context: dict[str, Any] = field(default_factory=dict)  # what plan() found that compute() needs again

    def named(self, metrics: dict[str, Any]) -> list[str]:
        """Every output lineage records: the folders, then what the metrics say was made (a model version)."""
        return [*self.outputs.values(), *self.lineage_outputs, *metrics.get("_outputs", ())]


class Stage:
    """One stage of the pipeline. Subclasses set `name` and write `plan` and `compute`."""

    name: ClassVar[str]
    # (metric counting rows in, metrics counting rows out): checked by the runner before the commit
    accounting: ClassVar[tuple[str, tuple[str, ...]] | None] = None

    def configure(self, spark: SparkSession, cfg: Config) -> Config:
        """The config this stage runs with, given what earlier stages made (train: tune's best settings).
        Called before the stage's MLflow run opens, so its params are the ones used. Default: cfg."""
        return cfg

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        raise NotImplementedError

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict[str, Any]:
        """Do the work, writing each output role into tmp[role]; return the stage's metrics."""
        raise NotImplementedError

    def reuse(self, spark: SparkSession, cfg: Config, plan: Plan) -> dict[str, Any] | None:
        """The metrics of earlier output made from exactly this plan, or None to do the work.

        The default: every output folder holds a meta with this fingerprint (a stage without output folders
        always runs)."""
        if not plan.outputs:
            return None
        metas = [lineage.reusable(spark, uri, plan.fingerprint) for uri in plan.outputs.values()]
        if not all(metas):
            return None
        log.info(
            "%s: %s is up to date (fingerprint %s), skipping; use --force to redo",
            self.name,
            " + ".join(plan.outputs.values()),
            plan.fingerprint,
        )
        return metas[0]["metrics"]


def check_accounting(stage: Stage, metrics: dict[str, Any]) -> None:
    if stage.accounting is None:
        return
    rows_in, rows_out = stage.accounting
    n_in, parts = metrics[rows_in], {k: metrics[k] for k in rows_out}
    if n_in != sum(parts.values()):
        out = " + ".join(f"{k} ({v})" for k, v in parts.items())
        raise AccountingError(f"{stage.name}: {rows_in} ({n_in}) != {out}; nothing was committed")


def execute(stage: Stage, spark: SparkSession, cfg: Config, force: bool = False) -> dict[str, Any]:
    """Run one stage under the contract; returns its metrics with `skipped` 0 or 1."""
    cfg = stage.configure(spark, cfg)  # idempotent: run_stage has usually done it already
    plan = stage.plan(spark, cfg)
    done = None if force else stage.reuse(spark, cfg, plan)
    if done is not None:
        lineage.log_lineage(stage.name, plan.fingerprint, plan.inputs, plan.named(done), skipped=True)
        return {**_public(done), "skipped": 1}
    with contextlib.ExitStack() as outputs:
        tmp = {role: outputs.enter_context(atomic_output(spark, uri)) for role, uri in plan.outputs.items()}
        metrics = stage.compute(spark, cfg, plan, tmp)
        check_accounting(stage, metrics)
        for i, (role, folder) in enumerate(tmp.items()):
            written_by = stage.name if i == 0 else f"{stage.name}-{role}"  # the first output is the stage's own
            lineage.write_meta(spark, folder, written_by, plan.fingerprint, plan.inputs, _public(metrics))
    lineage.log_lineage(stage.name, plan.fingerprint, plan.inputs, plan.named(metrics), skipped=False)
    return {**_public(metrics), "skipped": 0}


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics without the runner's private keys (what lineage names beside the folders)."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


def require_input(spark: SparkSession, uri: str, message: str) -> None:
    """A missing input is named with what to do, before any work starts."""
    if not HadoopFS(spark).exists(uri):
        raise FileNotFoundError(message)
