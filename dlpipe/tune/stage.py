"""The tune stage (driver side): an Optuna study whose trials run as Spark tasks, and the best settings it
hands to train.

- TPE samples each trial's settings from `tune.space`; `tune.concurrency` trials run at once, each a
  one-task Spark job (dlpipe.tune.trial: one rank, train split in, validation split scored).
- Poor trials are pruned on their per-epoch validation loss (Optuna's median rule, applied in the task).
- The study lives in `tune.storage` (an Optuna journal file on the driver by default), named after the
  stage's fingerprint: a killed tune stage resumes its study, and trials it left running count as failed.
- Every trial becomes an MLflow child run of the stage's run (its settings and curve); the stage's run
  holds the optimization history and the parameter importances.
- Its output, `<warehouse>/<dataset>/tune/best.json`, is what train lays over `train.*` when tune.enabled.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import time
from pathlib import Path
from typing import Any

from pyspark.sql import SparkSession

from dlpipe.config import Config
from dlpipe.data.features import read_stats
from dlpipe.stage import Plan, Stage, execute, require_input
from dlpipe.storage import HadoopFS, dataset_paths, lineage
from dlpipe.tune import space as tune_space

log = logging.getLogger(__name__)

BEST = "best.json"
# train settings that do not change what a trial learns (and so do not start a new study)
NOT_LEARNED = {"launcher", "max_attempts", "resume", "fault_injection", "slot_wait_seconds", "checkpoint_dir"}


def study_key(spark: SparkSession, cfg: Config) -> tuple[str, dict[str, str]]:
    """What names the study: the data, the search and the training it starts from. Not the number of trials
    (raising tune.trials goes on with the same study), concurrency, or where the study lives."""
    paths = dataset_paths(cfg)
    inputs = {paths.petastorm: lineage.dataset_fingerprint(spark, paths.petastorm)}
    spec = {
        "stage": "tune",
        "inputs": inputs,
        "tune": cfg.tune.model_dump(mode="json", exclude={"enabled", "trials", "concurrency", "storage"}),
        "train": cfg.train.model_dump(mode="json", exclude=NOT_LEARNED),
    }
    return lineage.digest(spec), inputs


def study_name(cfg: Config, key: str) -> str:
    return f"{cfg.model_name}-{key}"


def study_storage(cfg: Config) -> Any:
    """tune.storage as Optuna storage: a database URL as is; else a journal file on the driver's disk."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    where = cfg.tune.storage
    if where and "://" in where and not where.startswith("file://"):
        return where
    path = Path(where.removeprefix("file://")) if where else cfg.root / "data" / "tune" / f"{cfg.dataset.name}.journal"
    path = path if path.is_absolute() else cfg.root / path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def read_best(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """The tune stage's result for cfg's dataset; a missing one is named with what to run."""
    uri = f"{dataset_paths(cfg).tune}/{BEST}"
    require_input(spark, uri, f"train: tune.enabled but no tuning result at {uri}: run the tune stage first")
    return HadoopFS(spark).read_json(uri)


def tuned(spark: SparkSession, cfg: Config) -> Config:
    """cfg with the best trial's `train.*` settings when tune.enabled, else cfg itself."""
    if not cfg.tune.enabled:
        return cfg
    best = read_best(spark, cfg)
    return cfg.model_copy(update={"train": tune_space.apply(cfg.train, best["values"])})


class Tune(Stage):
    """Petastorm train and validation splits -> the best training settings (`tune/best.json`), reused when
    the data, the search and the base training config are unchanged."""

    name = "tune"

    def plan(self, spark: SparkSession, cfg: Config) -> Plan:
        from dlpipe.tracking import require_active_run

        if not cfg.tune.enabled:
            raise ValueError("the tune stage is off: set tune.enabled=true (conf or an override) to tune")
        if cfg.train.init_from:  # the space changes the architecture the parent's weights would have to fit
            raise ValueError("tune.enabled with train.init_from: tune without init_from first, then fine-tune")
        require_active_run("tune")
        paths = dataset_paths(cfg)
        require_input(spark, paths.stats, f"tune: no preprocessed data at {paths.petastorm}: run preprocess first")
        key, inputs = study_key(spark, cfg)
        # the output is reused only for the same study with as many trials
        fp = lineage.digest({"study": key, "trials": cfg.tune.trials})
        return Plan(fp, inputs, outputs={"tune": paths.tune}, context={"study": study_name(cfg, key)})

    def compute(self, spark: SparkSession, cfg: Config, plan: Plan, tmp: dict[str, str]) -> dict:
        import mlflow
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        stats = read_stats(spark, cfg)
        study = optuna.create_study(
            study_name=plan.context["study"],
            storage=study_storage(cfg),
            sampler=optuna.samplers.TPESampler(
                seed=cfg.tune.seed, n_startup_trials=cfg.tune.startup_trials, constant_liar=True
            ),
            direction="minimize",
            load_if_exists=True,
        )
        parent = mlflow.active_run().info.run_id
        logged = _restore(study, cfg, parent)
        started = time.time()
        _run_trials(spark, cfg, stats, study, parent, logged)
        return _finish(spark, cfg, study, tmp["tune"], time.time() - started)


def run(spark: SparkSession, cfg: Config, force: bool = False) -> dict:
    """The tune stage (see Tune)."""
    return execute(Tune(), spark, cfg, force)


def _restore(study: Any, cfg: Config, parent: str) -> int:
    """A resumed study: trials a killed stage left running are marked failed (they are run again as new
    trials); the finished ones count and are logged under this stage's run. Returns how many finished."""
    from optuna.trial import TrialState

    interrupted = [t for t in study.trials if t.state == TrialState.RUNNING]
    for t in interrupted:
        study.tell(t.number, state=TrialState.FAIL)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if finished or interrupted:
        log.info(
            "tune: resuming study %s: %d trials finished, %d left running by a stopped run (marked failed)",
            study.study_name,
            len(finished),
            len(interrupted),
        )
    for t in finished:
        history = [{"epoch": step, "val_loss": value} for step, value in sorted(t.intermediate_values.items())]
        values = tune_space.values_of(t.params, cfg.tune.space)
        _log_trial(parent, t.number, values, history, t.state.name.lower(), t.value, restored=True)
    return len(finished)


def _run_trials(spark: SparkSession, cfg: Config, stats: Any, study: Any, parent: str, finished: int) -> None:
    """Ask, run and tell until the study holds tune.trials finished trials, tune.concurrency at a time."""
    from optuna.trial import TrialState

    from dlpipe.train.stage import make_spec
    from dlpipe.tune.trial import TrialSpec

    sc = spark.sparkContext
    want, pending, failures = cfg.tune.trials, {}, []
    started, done_here = time.time(), 0
    with cf.ThreadPoolExecutor(cfg.tune.concurrency, thread_name_prefix="dlpipe-tune") as pool:
        while finished + len(pending) < want or pending:
            while finished + len(pending) < want and len(pending) < cfg.tune.concurrency:
                trial = study.ask()
                values = tune_space.suggest(trial, cfg.tune.space)
                train = tune_space.single_rank(tune_space.apply(cfg.train, values), cfg.train.num_proc)
                spec = TrialSpec(
                    number=trial.number,
                    train=make_spec(cfg.model_copy(update={"train": train}), stats, checkpoints=""),
                    finished=tuple(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
                    prune_warmup_epochs=cfg.tune.prune_warmup_epochs,
                    prune_min_trials=cfg.tune.prune_min_trials,
                )
                pending[pool.submit(_on_spark, sc, spec)] = (trial, values)
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                trial, values = pending.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # the trial's Spark job failed: the study goes on without it
                    study.tell(trial, state=TrialState.FAIL)
                    failures.append(f"trial {trial.number}: {str(exc).strip().splitlines()[-1][:300]}")
                    log.warning("tune: %s", failures[-1])
                    _log_trial(parent, trial.number, values, [], "fail", None)
                    if len(failures) >= max(3, want):
                        raise RuntimeError("tune: every trial failed; the first: " + failures[0]) from exc
                    continue
                state = _tell(study, trial, result)
                finished += 1
                done_here += 1
                _log_trial(parent, trial.number, values, result["history"], state, result["best_val_loss"])
                eta = (time.time() - started) / done_here * (want - finished)
                log.info(
                    "tune: trial %d %s, best val_loss %.4f after %d epochs (%d/%d finished; best %.4f; ETA %.0fs)",
                    trial.number,
                    state,
                    result["best_val_loss"],
                    len(result["history"]),
                    finished,
                    want,
                    study.best_value,
                    eta,
                )


def _on_spark(sc: Any, spec: Any) -> dict:
    """One trial as a one-task Spark job (this thread's job description names it in Spark's UI)."""
    from dlpipe.tune.trial import run_trial

    sc.setJobDescription(f"dlpipe tune: trial {spec.number}")
    return sc.parallelize([spec], 1).map(run_trial).collect()[0]


def _tell(study: Any, trial: Any, result: dict) -> str:
    """Record the trial's curve and outcome in the study: pruned, or complete with its best val_loss."""
    from optuna.trial import TrialState

    for record in result["history"]:
        if math.isfinite(record["val_loss"]):
            trial.report(record["val_loss"], record["epoch"])
    if result["pruned_at"] is not None or not math.isfinite(result["best_val_loss"]):
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    study.tell(trial, result["best_val_loss"])
    return "complete"


def _log_trial(
    parent: str,
    number: int,
    values: dict[str, Any],
    history: list[dict],
    state: str,
    value: float | None,
    restored: bool = False,
) -> None:
    """The trial as a child run of the tune run: its settings as params, its curve as metrics by epoch."""
    import mlflow
    from mlflow.entities import Metric, Param, RunTag

    from dlpipe.tracking import _param_value

    client = mlflow.MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    tags = {"mlflow.parentRunId": parent, "mlflow.runName": f"trial-{number}", "dlpipe.kind": "trial"}
    tags.update({"dlpipe.trial": str(number), "dlpipe.trial_state": state, "dlpipe.trial_restored": str(restored)})
    run = client.create_run(experiment, tags=tags)
    now = int(time.time() * 1000)
    metrics = [
        Metric(k, float(v), now, int(r["epoch"]))
        for r in history
        for k, v in r.items()
        if k != "epoch" and isinstance(v, int | float) and math.isfinite(v)
    ]
    if value is not None and math.isfinite(value):
        metrics.append(Metric("best_val_loss", float(value), now, 0))
    params = [Param(k, _param_value(v)) for k, v in values.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=params, tags=[RunTag("dlpipe.trial", str(number))])
    client.set_terminated(run.info.run_id, "FINISHED" if state != "fail" else "FAILED")


def _finish(spark: SparkSession, cfg: Config, study: Any, out: str, seconds: float) -> dict:
    """best.json and the study's trials into the output folder; the plots onto the stage's run."""
    import mlflow
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError(f"tune: no trial of study {study.study_name} completed: nothing to hand to train")
    best = study.best_trial
    values = tune_space.values_of(best.params, cfg.tune.space)
    fs = HadoopFS(spark)
    fs.write_json(
        f"{out}/{BEST}",
        {"study": study.study_name, "trial": best.number, "best_val_loss": best.value, "values": values},
    )
    trials = [
        {"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params} for t in study.trials
    ]
    fs.write_json(f"{out}/trials.json", trials)
    mlflow.log_dict({"best_trial": best.number, "values": values}, "tune/best.json")
    _plots(study, complete)
    counts = {
        s: sum(t.state == getattr(TrialState, s.upper()) for t in study.trials) for s in ("complete", "pruned", "fail")
    }
    log.info(
        "tune: best trial %d (val_loss %.4f) of %d: %s",
        best.number,
        best.value,
        len(study.trials),
        ", ".join(f"{k}={v}" for k, v in values.items()),
    )
    return {
        "best_val_loss": best.value,
        "best_trial": best.number,
        "trials_complete": counts["complete"],
        "trials_pruned": counts["pruned"],
        "trials_failed": counts["fail"],
        "tune_seconds": round(seconds, 1),
    }


def _plots(study: Any, complete: list) -> None:
    """The optimization history, and (with two finished trials or more) each setting's importance."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.visualization import matplotlib as ovm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
        ax = ovm.plot_optimization_history(study)
        mlflow.log_figure(ax.figure, "tune/optimization_history.png")
        plt.close(ax.figure)
        if len(complete) >= 2:
            ax = ovm.plot_param_importances(study)
            mlflow.log_figure(ax.figure, "tune/param_importances.png")
            plt.close(ax.figure)
        else:
            log.info("tune: one finished trial: no parameter importances to plot")
