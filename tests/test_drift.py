"""The drift watch (dlpipe.data.drift): the train split's reference fitted by preprocess, counted by infer on
new data in its scoring pass, reported, logged, tagged and, when asked, failing the run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from dlpipe.config import MonitorConfig
from dlpipe.data import drift
from dlpipe.data.features import read_stats
from dlpipe.data.generate import generate
from dlpipe.data.stats import FeatureStats, FittedStats
from dlpipe.ops.status import drift_verdicts, render_drift
from dlpipe.pipeline import run_pipeline, run_stage
from dlpipe.storage import dataset_paths
from dlpipe.tracking import tracking_uri
from tests.conftest import make_cfg, prepare


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    same = drift.psi([0.25, 0.25, 0.5], [0.25, 0.25, 0.5])
    some = drift.psi([0.25, 0.25, 0.5], [0.3, 0.25, 0.45])
    much = drift.psi([0.25, 0.25, 0.5], [0.7, 0.2, 0.1])
    assert same == 0.0 and 0 < some < 0.1 < 0.25 < much
    assert drift.psi([0.5, 0.5, 0.0], [0.5, 0.5, 0.0]) == 0.0  # an empty bin on both sides is no shift


def test_the_report_names_what_passed_which_threshold():
    stats = FittedStats(
        key="id",
        label="y",
        features=(
            FeatureStats("a", "standardize", mean=0, std=1, drift_edges=(0.0,), drift_shares=(0.5, 0.5)),
            FeatureStats("b", "standardize", mean=0, std=1, drift_edges=(0.0,), drift_shares=(0.5, 0.5)),
            FeatureStats(
                "c", "onehot", vocab=("p", "q"), drift_shares=(0.5, 0.5, 0.0), fill="p", missing_share_train=0.0
            ),
        ),
        feature_names=("a", "b", "c=p", "c=q"),
        feature_shape=(4,),
        num_classes=2,
        class_counts_train=(50, 50),
    )
    counts = {"__valid": 100, "a__b0": 50, "a__b1": 50, "b__b0": 95, "b__b1": 5}
    counts |= {"c__v0": 40, "c__v1": 40, "c__other": 20, "c__missing": 30}
    rep = drift.report(counts, {"__pred__b0": 52, "__pred__b1": 48}, stats, 110, 10, MonitorConfig())
    assert rep["features"]["a"]["psi"] == 0.0 and rep["features"]["b"]["psi"] > 0.25
    assert rep["features"]["c"]["unseen_share"] == pytest.approx(0.2)
    assert rep["features"]["c"]["missing_share"] == pytest.approx(0.3)
    assert rep["drifted_features"] == ["b", "c"] and rep["verdict"] == "alert"
    assert any(a.startswith("quarantined share 0.091") for a in rep["alerts"])  # 10 of 110 > 0.05
    assert rep["prediction_psi"] < 0.01
    calm = drift.report(
        {**counts, "b__b0": 50, "b__b1": 50, "c__other": 0, "c__v0": 50, "c__v1": 50, "c__missing": 0},
        {"__pred__b0": 50, "__pred__b1": 50},
        stats,
        100,
        0,
        MonitorConfig(),
    )
    assert calm["verdict"] == "ok" and calm["alerts"] == []


def _new_data(cfg, root: Path, name: str, *overrides: str) -> str:
    """Rows of the same generator with another seed (and the overrides, e.g. a covariate shift)."""
    out = root / name
    generate(make_cfg(root, "dataset.generator.seed=99", "dataset.generator.rows=2000", *overrides), out.as_uri())
    return str(out)


@pytest.mark.slow
def test_new_data_with_a_known_shift_raises_the_alert_naming_the_shifted_features(spark, tmp_path):
    cfg = prepare(spark, tmp_path, rows=3000)
    run_pipeline(spark, cfg, stages=("train",))
    stats = read_stats(spark, cfg)
    assert [f.name for f in drift.watched_numbers(cfg, stats)] == [f"x{i}" for i in range(8)]
    assert all(len(stats.feature(f"x{i}").drift_shares) == 10 for i in range(8))  # deciles: 10 bins

    same = make_cfg(tmp_path, f"infer.source={_new_data(cfg, tmp_path, 'same')}", rows=3000)
    m = run_stage(spark, same, "infer")
    assert m["drift_alerts"] == 0, m
    assert max(m[f"drift_psi_x{i}"] for i in range(8)) < 0.1 and m["drift_psi_segment"] < 0.1
    report = json.loads(Path(dataset_paths(same).infer_output.removeprefix("file://"), drift.REPORT_FILE).read_text())
    assert report["verdict"] == "ok" and report["rows_in"] == m["rows_in"]

    shifted_data = _new_data(cfg, tmp_path, "shifted", "dataset.generator.shift=1.0")
    shifted = make_cfg(tmp_path, f"infer.source={shifted_data}", "infer.output=scored-shifted", rows=3000)
    m = run_stage(spark, shifted, "infer")
    assert m["drift_alerts"] >= 8 and min(m[f"drift_psi_x{i}"] for i in range(8)) > 0.25, m
    assert m["drift_psi_segment"] < 0.1  # the categories were not shifted
    client = mlflow.MlflowClient(tracking_uri(same))
    run = client.search_runs(
        [client.get_experiment_by_name("dlpipe").experiment_id],
        filter_string="tags.`dlpipe.stage` = 'infer'",
        order_by=["attributes.start_time DESC"],
    )[0]
    assert run.data.tags["dlpipe.drift"] == "alert"
    assert run.data.tags["dlpipe.drift_features"] == ",".join(f"x{i}" for i in range(8))
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "drift")}
    assert {"drift/report.json", "drift/worst_features.png"} <= logged

    failing = make_cfg(
        tmp_path, f"infer.source={shifted_data}", "infer.output=scored-failing", "monitor.fail_on_alert=true", rows=3000
    )
    with pytest.raises(drift.DriftAlert, match="x0: psi"):
        run_stage(spark, failing, "infer")
    assert not Path(dataset_paths(failing).infer_output.removeprefix("file://")).exists()  # nothing written

    (last,) = drift_verdicts(cfg)  # what `python -m dlpipe status` ends with: the model's last verdict
    assert (last["model"], last["verdict"]) == (cfg.model_name, "alert") and last["features"].startswith("x0,x1")
    assert "drift       alert" in render_drift([last]) and cfg.model_name in render_drift([last])
