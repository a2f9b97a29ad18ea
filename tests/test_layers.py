"""The package layout: what runs on executors stays light, driver stages load no framework they do not use,
and the README's layout section names every module there is."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO

# What Spark ships to and runs in executor processes: the training ranks, the scorers and the UDFs.
EXECUTOR_MODULES = (
    "dlpipe.train.worker",
    "dlpipe.train.loader",
    "dlpipe.train.comm",
    "dlpipe.train.checkpoints",
    "dlpipe.train.models",
    "dlpipe.train.live",
    "dlpipe.train.logstream",
    "dlpipe.train.launcher",  # the barrier task itself runs there
    "dlpipe.serve.scoring",
    "dlpipe.data.tensors",
    "dlpipe.tune.trial",  # a tuning trial's task
    "udfs.score",
)
# Driver-only: stage orchestration, Spark DataFrame stages, MLflow registry work, operations.
DRIVER_ONLY = re.compile(
    r"^dlpipe\.(pipeline|stage|cli|notebook|session|train\.stage|data\.(ingest|features|generate|drift)"
    r"|model\.(evaluate|promotion|quantize|baseline|compress|students)|serve\.(infer|serving|server)|serving|storage\.(lineage|runlock)|tune\.stage|ops\..*)$"
)


def _imported_by(*modules: str) -> list[str]:
    """The modules a fresh interpreter holds after importing these."""
    code = f"import json, sys\nfor m in {list(modules)!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def test_executor_code_imports_no_driver_only_module():
    loaded = _imported_by(*EXECUTOR_MODULES)
    assert [m for m in loaded if DRIVER_ONLY.match(m)] == []
    assert "dlpipe.train.worker" in loaded  # the import did happen
    # and the check would catch one
    assert DRIVER_ONLY.match("dlpipe.train.stage") and DRIVER_ONLY.match("dlpipe.ops.ship")


def test_the_spark_stages_do_not_load_torch_on_the_driver():
    """ingest, preprocess, evaluate and infer's planning are Spark work; torch loads only where a model is."""
    loaded = _imported_by("dlpipe.data.ingest", "dlpipe.data.features", "dlpipe.model.evaluate", "dlpipe.serve.infer")
    assert "dlpipe.serve.infer" in loaded
    assert [m for m in loaded if m.split(".")[0] in ("torch", "horovod")] == []


def _layout_block() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Layout") :]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_the_readme_layout_names_every_module_and_nothing_else():
    block = _layout_block()
    lib = block[: block.index("\njobs/")]
    named = set(re.findall(r"([A-Za-z_]+\.py)", lib))
    folders = set(re.findall(r"^  ([a-z_]+)/", lib, re.M))
    tree = REPO / "dlpipe"
    actual_folders = {p.name for p in tree.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == actual_folders
    actual = {p.name for p in tree.rglob("*.py") if p.name != "__init__.py" or p.parent.name == "storage"}
    assert named - actual == set(), "the README names modules that do not exist"
    assert actual - named == set(), "modules the README's layout does not name"


def test_a_dlpipe_command_starts_with_the_collector_sized_for_its_heap():
    """dlpipe.runtime.tune_gc runs first in `python -m dlpipe` (and the jobs, the ranks and the trials): Python's
    default thresholds (700, 10, 10) spent a fifth of a driver's CPU walking torch's and MLflow's objects."""
    from dlpipe.runtime import GC_THRESHOLDS

    code = (
        "import contextlib, gc, json\nfrom dlpipe.__main__ import main\nbefore = gc.get_threshold()\n"
        "with contextlib.suppress(SystemExit):\n    main(['--help'])\nprint(json.dumps([before, gc.get_threshold()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    before, after = json.loads(out.stdout.strip().splitlines()[-1])
    assert before == [700, 10, 10] and after == list(GC_THRESHOLDS) != before
