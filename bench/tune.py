"""Tune group: does the tune stage find settings that beat the defaults, and does the network beat the
tree baseline, on the built-in example?

In one fresh project folder, on the built-in example (30,000 rows; its Bayes accuracy is what its generator
computes, 0.933), two `python -m dlpipe run`s in processes of their own, with nothing else set:
1. the defaults (every stage; evaluate also trains the XGBoost tree baseline on the same split);
2. tune.enabled=true with tune.trials (BENCH_TUNE_TRIALS, default 20): the data stages are reused, the tune
   stage runs its study, train uses the best trial's settings, infer and evaluate score the test split
   (without the baseline again).

Printed: default_test_accuracy, tuned_test_accuracy, bayes_accuracy (from generate's manifest),
tune_seconds (the tune stage alone), tuned_minus_default (accuracy points), baseline_test_accuracy,
baseline_train_seconds and tuned_minus_baseline.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("data/bench/tune-root").resolve()
DONE = re.compile(r"stage (\w+): done in ([\d.]+)s (\{.*\})")


def _run(*overrides: str) -> dict[str, dict]:
    return run_dlpipe(ROOT, "quantize.enabled=false", *overrides)


def run_dlpipe(root: Path, *args: str) -> dict[str, dict]:
    """`python -m dlpipe run` in root, in a process of its own; each stage's metrics, as its 'done' line
    logged them."""
    import ast

    cmd = [sys.executable, "-m", "dlpipe", "run", f"project.root={root}", *args]
    env = {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
    }
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    stages = {m[1]: ast.literal_eval(m[3]) for m in DONE.finditer(proc.stderr)}
    for line in proc.stderr.splitlines():
        if "tune: trial" in line or "tune: best" in line:
            print(line, flush=True)
    print(f"# {' '.join(args)}: {time.time() - started:.0f}s", flush=True)
    return stages


def run() -> dict[str, float]:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    trials = int(os.environ.get("BENCH_TUNE_TRIALS", "20"))
    default = _run()
    tuned = _run("tune.enabled=true", f"tune.trials={trials}", "evaluate.baseline.enabled=false")
    figures = {
        "default_test_accuracy": default["evaluate"]["accuracy"],
        "tuned_test_accuracy": tuned["evaluate"]["accuracy"],
        "bayes_accuracy": default["generate"]["bayes_accuracy"],
        "tune_seconds": tuned["tune"]["seconds"],
        "tune_trials_complete": tuned["tune"]["trials_complete"],
        "tune_trials_pruned": tuned["tune"]["trials_pruned"],
    }
    figures["tuned_minus_default"] = figures["tuned_test_accuracy"] - figures["default_test_accuracy"]
    figures["baseline_test_accuracy"] = default["evaluate"]["baseline_accuracy"]
    figures["baseline_train_seconds"] = default["evaluate"]["baseline_train_seconds"]
    figures["tuned_minus_baseline"] = figures["tuned_test_accuracy"] - figures["baseline_test_accuracy"]
    return figures
