"""The tune stage: an Optuna study on Spark whose best settings feed train (dlpipe.tune)."""

from __future__ import annotations

import math
import shutil

import mlflow
import optuna
import pytest

from dlpipe import tracking
from dlpipe.config import ConfigError, TrainConfig, load_config
from dlpipe.data.features import read_stats
from dlpipe.pipeline import run_pipeline, run_stage, stages_for
from dlpipe.storage import dataset_paths
from dlpipe.tune import space as tune_space
from tests.conftest import REPO, make_cfg, prepare

# a small search that still varies every kind of dimension: a log range, choices, layers, an int range
SMALL = (
    "tune.enabled=true",
    "tune.space.train.epochs={low: 2, high: 4}",
    "tune.space.train.batch_size={choices: [64, 128]}",
    "tune.startup_trials=2",
    "tune.prune_min_trials=1",
    "tune.prune_warmup_epochs=1",
)


def test_the_space_turns_into_settings_in_the_configs_own_units():
    cfg = load_config("local", ["tune.space.train.model.params.depth_bonus={low: 0, high: 3}"], conf_dir=REPO / "conf")
    space = cfg.tune.space
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(8):
        trial = study.ask()
        values = tune_space.suggest(trial, space)
        assert set(values) == set(space)
        hidden = values["train.model.hidden"]
        assert 1 <= len(hidden) <= 3 and all(32 <= w <= 256 and isinstance(w, int) for w in hidden)
        assert 0.0003 <= values["train.lr"] <= 0.03 and values["train.batch_size"] in (64, 128, 256, 512)
        assert isinstance(values["train.epochs"], int) and 8 <= values["train.epochs"] <= 30
        assert values["train.model.params.depth_bonus"] in range(4)
        assert tune_space.values_of(trial.params, space) == values  # what the study records maps back
        train = tune_space.apply(cfg.train, values)
        assert train.model.hidden == hidden and train.lr == values["train.lr"]
        assert train.model.params["depth_bonus"] == values["train.model.params.depth_bonus"]
        assert train.launcher == cfg.train.launcher  # what the space does not hold is the config's
        solo = tune_space.single_rank(train, 2)
        assert (solo.batch_size, solo.lr) == (2 * train.batch_size, pytest.approx(2 * train.lr))
        study.tell(trial, 1.0)


def test_a_bad_search_space_names_the_key_and_the_fix():
    with pytest.raises(ConfigError, match=r"'train\.launcher' is not a tunable setting; known: train\.epochs"):
        load_config("local", ["tune.space.train.launcher={choices: [horovod]}"], conf_dir=REPO / "conf")
    with pytest.raises(ConfigError, match=r"tune\.space\.train\.lr.*low \(0\) must be below high \(0\)"):
        load_config("local", ["tune.space.train.lr={low: 0, high: 0}"], conf_dir=REPO / "conf")
    with pytest.raises(ConfigError, match=r"give low and high, or choices, or layers and width"):
        load_config("local", ["tune.space.train.epochs={}"], conf_dir=REPO / "conf")
    # conf lays its dimensions over the defaults; null drops one
    cfg = load_config("local", ["tune.space.train.epochs=null"], conf_dir=REPO / "conf")
    assert "train.epochs" not in cfg.tune.space and "train.lr" in cfg.tune.space
    with pytest.raises(ValueError, match="the tune stage is off: set tune.enabled=true"):
        from dlpipe.tune.stage import Tune

        Tune().plan(None, load_config("local", conf_dir=REPO / "conf"))
    assert "tune" not in stages_for(load_config("local", conf_dir=REPO / "conf"))
    assert "tune" in stages_for(load_config("local", ["tune.enabled=true"], conf_dir=REPO / "conf"))


def _trial_spec(spark, cfg, finished=(), **settings):
    from dlpipe.train.stage import make_spec
    from dlpipe.tune.trial import TrialSpec

    train = TrainConfig.model_validate({**cfg.train.model_dump(mode="json"), **settings})
    spec = make_spec(cfg.model_copy(update={"train": train}), read_stats(spark, cfg), checkpoints="")
    return TrialSpec(0, spec, tuple(finished), prune_warmup_epochs=2, prune_min_trials=1)


def _finished_trial(loss: float, epochs: int) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(value=loss, intermediate_values={e: loss for e in range(1, epochs + 1)})


def test_a_trial_reads_only_train_and_validation_and_is_pruned_when_behind(spark, tmp_path):
    """In-process (the function a task runs): the test split is moved away and never missed; a trial far
    behind finished ones stops at the pruner's first allowed epoch; ahead of them, it runs every epoch."""
    from dlpipe.tune.trial import run_trial

    cfg = prepare(spark, tmp_path, rows=1500)
    test_split = dataset_paths(cfg).split("test").removeprefix("file://")
    shutil.move(test_split, tmp_path / "test-split-elsewhere")

    free = run_trial(_trial_spec(spark, cfg, [_finished_trial(9.0, 5)], epochs=4))
    assert free["pruned_at"] is None and [r["epoch"] for r in free["history"]] == [1, 2, 3, 4]
    assert free["best_val_loss"] == min(r["val_loss"] for r in free["history"])
    assert all(r["val_accuracy"] > 0 for r in free["history"])

    behind = run_trial(_trial_spec(spark, cfg, [_finished_trial(1e-6, 5)], epochs=4))
    assert behind["pruned_at"] == 2 and len(behind["history"]) == 2  # warm-up: not before epoch 2


@pytest.mark.slow
def test_tune_runs_trials_as_spark_tasks_and_train_uses_the_best(spark, tmp_path):
    """4 trials, 2 at a time, on data whose test split is elsewhere meanwhile; a factory parameter of the
    user's own model is searched too. Every trial is a child run with its settings and curve, the tune run
    holds the plots, and train's run shows the best trial's settings as its params."""
    factory = (
        "train.model.factory=tests.model_factories:mlp_trained_in",
        "tune.space.train.model.params.dtype={choices: [float32]}",  # bfloat16 (the default) would fail
        "tune.space.train.model.hidden={layers: [1, 2], width: [16, 64]}",
    )
    overrides = (*SMALL, *factory, "tune.trials=4", "tune.concurrency=2")
    cfg = prepare(spark, tmp_path, *overrides, rows=3000)
    test_split = dataset_paths(cfg).split("test").removeprefix("file://")
    shutil.move(test_split, tmp_path / "test-split-elsewhere")

    result = run_pipeline(spark, cfg, stages=["tune", "train"])
    tune, train = result.metrics["tune"], result.metrics["train"]
    assert tune["trials_complete"] + tune["trials_pruned"] == 4 and tune["trials_failed"] == 0
    client = mlflow.MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("dlpipe").experiment_id
    tune_run = client.search_runs([exp], "tags.`dlpipe.stage` = 'tune'")[0]
    trials = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{tune_run.info.run_id}'")
    assert sorted(int(r.data.tags["dlpipe.trial"]) for r in trials) == [0, 1, 2, 3]
    for r in trials:
        assert {"train.lr", "train.epochs", "train.model.hidden", "train.model.params.dtype"} <= set(r.data.params)
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_loss")]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= 4
    artifacts = {a.path for a in client.list_artifacts(tune_run.info.run_id, "tune")}
    assert {"tune/optimization_history.png", "tune/param_importances.png", "tune/best.json"} <= artifacts

    best = {t: r for t, r in ((int(r.data.tags["dlpipe.trial"]), r) for r in trials)}[int(tune["best_trial"])]
    assert best.data.metrics["best_val_loss"] == pytest.approx(tune["best_val_loss"])
    train_run = client.get_run(client.get_model_version(cfg.model_name, str(train["model_version"])).run_id)
    for key in ("train.lr", "train.epochs", "train.batch_size", "train.model.hidden", "train.weight_decay"):
        assert train_run.data.params[key] == best.data.params[key], key
    assert train_run.data.tags["dlpipe.tune_trial"] == str(tune["best_trial"])

    again = run_stage(spark, cfg, "tune")
    assert again["skipped"] == 1 and again["best_trial"] == tune["best_trial"]


@pytest.mark.slow
def test_a_stopped_study_is_resumed_and_more_trials_extend_it(spark, tmp_path):
    """A tune stage of 2 trials, then the study as a killed stage leaves it (a trial still RUNNING in the
    journal, no output for that run), then tune.trials=4: the same study goes on. The cut-off trial counts
    as failed, the 2 finished ones are kept (and logged again under the new tune run), 2 more run."""
    from dlpipe.tune.stage import study_key, study_name, study_storage

    cfg = prepare(spark, tmp_path, *SMALL, "tune.trials=2", "tune.concurrency=1", rows=1500)
    first = run_stage(spark, cfg, "tune")
    assert first["trials_complete"] + first["trials_pruned"] == 2 and first["trials_failed"] == 0
    name = study_name(cfg, study_key(spark, cfg)[0])
    cut_off = optuna.load_study(study_name=name, storage=study_storage(cfg)).ask()  # left RUNNING, as by a kill

    more = make_cfg(tmp_path, *SMALL, "tune.trials=4", "tune.concurrency=1", rows=1500)
    assert study_name(more, study_key(spark, more)[0]) == name  # more trials: the same study
    m = run_stage(spark, more, "tune")
    assert m["skipped"] == 0 and m["trials_complete"] + m["trials_pruned"] == 4
    assert m["trials_failed"] == 1
    trials = optuna.load_study(study_name=name, storage=study_storage(cfg)).trials
    assert trials[cut_off.number].state == optuna.trial.TrialState.FAIL and len(trials) == 5
    client = mlflow.MlflowClient(tracking.tracking_uri(cfg))
    exp = client.get_experiment_by_name("dlpipe").experiment_id
    tune_run = client.search_runs([exp], "tags.`dlpipe.stage` = 'tune'", order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{tune_run.info.run_id}'")
    restored = [int(r.data.tags["dlpipe.trial"]) for r in children if r.data.tags["dlpipe.trial_restored"] == "True"]
    assert sorted(restored) == [0, 1]
    assert math.isfinite(m["best_val_loss"]) and m["best_val_loss"] <= first["best_val_loss"]
    assert run_stage(spark, more, "tune")["skipped"] == 1  # done: the same study and trials are reused
