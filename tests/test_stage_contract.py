"""The stage contract: a new stage is its own logic only; the runner skips, commits, accounts and logs lineage."""

from __future__ import annotations

import json

import mlflow
import pytest

from dlpipe import tracking
from dlpipe.stage import AccountingError, Plan, Stage, execute
from dlpipe.storage import dataset_base, lineage, local_path
from tests.conftest import make_cfg


class Squares(Stage):
    """A toy stage: n numbers in, the even ones to `even`, the odd ones to `odd`."""

    name = "squares"
    accounting = ("rows_in", ("rows_even", "rows_odd"))

    def __init__(self, n: int, lose_one: bool = False) -> None:
        self.n, self.lose_one, self.computed = n, lose_one, 0

    def plan(self, spark, cfg) -> Plan:
        base = dataset_base(cfg)
        inputs = {"range://squares": str(self.n)}
        return Plan(lineage.digest({"n": self.n}), inputs, {"even": f"{base}/even", "odd": f"{base}/odd"})

    def compute(self, spark, cfg, plan, tmp) -> dict:
        self.computed += 1
        df = spark.range(self.n).selectExpr("id", "id * id AS square")
        df.where("id % 2 = 0").write.parquet(tmp["even"])
        df.where("id % 2 = 1").write.parquet(tmp["odd"])
        odd = spark.read.parquet(tmp["odd"]).count()
        return {"rows_in": self.n, "rows_even": self.n - odd, "rows_odd": odd - int(self.lose_one)}


@pytest.fixture
def cfg(tmp_path):
    return make_cfg(tmp_path)


def test_a_new_stage_is_committed_reused_and_redone_on_force(spark, cfg):
    stage = Squares(10)
    with tracking.pipeline_run(cfg, "test-contract"), tracking.stage_run(cfg, "squares") as run:
        first = execute(stage, spark, cfg)
    assert first == {"rows_in": 10, "rows_even": 5, "rows_odd": 5, "skipped": 0}
    base = local_path(dataset_base(cfg))
    assert spark.read.parquet(str(base / "even")).count() == 5
    metas = {role: json.loads((base / role / lineage.META).read_text()) for role in ("even", "odd")}
    assert metas["even"]["stage"] == "squares" and metas["odd"]["stage"] == "squares-odd"
    assert metas["even"]["metrics"]["rows_odd"] == 5 and metas["odd"]["inputs"] == {"range://squares": "10"}
    tags = mlflow.MlflowClient(tracking.tracking_uri(cfg)).get_run(run.info.run_id).data.tags
    assert tags["dlpipe.skipped"] == "false" and tags["dlpipe.outputs"].split(",")[0].endswith("/even")

    again = execute(stage, spark, cfg)
    assert again == {**first, "skipped": 1} and stage.computed == 1
    forced = execute(stage, spark, cfg, force=True)
    assert forced["skipped"] == 0 and stage.computed == 2
    changed = execute(Squares(12), spark, cfg)  # a different plan: the outputs are not reused
    assert changed["rows_even"] == 6 and changed["skipped"] == 0


def test_rows_that_do_not_add_up_commit_nothing(spark, cfg):
    with pytest.raises(AccountingError, match=r"squares: rows_in \(9\) != rows_even \(5\) \+ rows_odd \(3\)"):
        execute(Squares(9, lose_one=True), spark, cfg)
    base = local_path(dataset_base(cfg))
    assert not (base / "even").exists() and not (base / "odd").exists()
    assert not list(base.glob("*.tmp-*")), "the temporary folders were left behind"


def test_a_stage_with_only_a_partial_earlier_output_is_redone(spark, cfg):
    stage = Squares(6)
    execute(stage, spark, cfg)
    (local_path(dataset_base(cfg)) / "odd" / lineage.META).unlink()  # as if odd had been replaced by hand
    assert execute(stage, spark, cfg)["skipped"] == 0 and stage.computed == 2
