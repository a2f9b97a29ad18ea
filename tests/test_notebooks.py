"""The notebooks run headless (nbclient, the project's kernel) in a temporary folder, in the order a user
runs them, so they cannot break unnoticed; and they are committed without outputs."""

from __future__ import annotations

import os

import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

from dlpipe.model.names import CANDIDATE, INT8_ALIAS
from tests.conftest import REPO

NOTEBOOKS = REPO / "notebooks"


@pytest.mark.parametrize("name", ["quickstart.ipynb", "explore_model.ipynb"])
def test_notebooks_are_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), f"{name} holds outputs"


def _execute(name: str, root, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("DLPIPE_NOTEBOOK_ROOT", str(root))  # the kernel inherits it: data and MLflow go there
    # the int8 variant (its own tests check it) and the Spark UI are work nothing here looks at, nor is the
    # model's quality (the notebooks' 3,000 rows and 4 epochs halved); a short study gives model exploration
    # tuning trials to show
    overrides = "quantize.enabled=false spark.conf.spark.ui.enabled=false dataset.generator.rows=1500"
    overrides += " tune.enabled=true tune.trials=2 'tune.space.train.epochs={low: 1, high: 2}'"
    monkeypatch.setenv("DLPIPE_NOTEBOOK_OVERRIDES", overrides)
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")
    monkeypatch.setenv("PYSPARK_PYTHON", os.environ.get("PYSPARK_PYTHON", str(REPO / ".venv/bin/python")))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    return nb


def _outputs(nb, kind: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]


@pytest.mark.slow
def test_quickstart_then_model_exploration_run_headless(tmp_path, monkeypatch):
    quick = _execute("quickstart.ipynb", tmp_path, monkeypatch)
    assert not _outputs(quick, "error")
    images = [o for o in _outputs(quick, "execute_result") + _outputs(quick, "display_data") if "image/png" in o.data]
    assert len(images) >= 2  # the learning curve and the confusion matrix were drawn
    assert (tmp_path / "data/warehouse/tabular_example/predictions").is_dir()
    assert (tmp_path / "mlruns/mlflow.db").is_file()  # the notebook wrote where it was told, not the repo
    registered = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db").get_registered_model(
        "tabular_example-classifier"
    )
    assert CANDIDATE in registered.aliases and INT8_ALIAS not in registered.aliases  # the overrides applied

    explore = _execute("explore_model.ipynb", tmp_path, monkeypatch)
    assert not _outputs(explore, "error")
    tables = [o.data["text/plain"] for o in _outputs(explore, "execute_result") if "text/plain" in o.data]
    assert any("production" in t for t in tables)  # the versions table shows the promoted alias
    assert any("predicted_class" in t for t in tables)  # the production model answered raw records by name
    assert any("tree baseline" in t and "macro_f1" in t for t in tables)  # the network beside the trees
    assert any("best_val_loss" in t and "train.lr" in t for t in tables)  # the tuning trials, with settings
    assert any("onnx" in t and "spark_rows_per_s" in t for t in tables)  # the variants table
    assert any("drift_psi_x0" in t and "alert" in t for t in tables)  # the scoring runs' drift, the shift alerted
    figures = [o for o in _outputs(explore, "execute_result") if "image/png" in o.data]
    # the baseline and variant comparisons, drift over time, the optimization history, the confusion matrix
    assert len(figures) >= 5
