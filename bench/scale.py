"""Scale group: the whole pipeline at growing sizes on the embedded defaults, timed and its memory watched.

For each size in BENCH_SCALE_ROWS (default 2,000,000, 6,000,000 and 20,000,000 rows of the built-in
example, about 100 bytes of CSV a row) `python -m dlpipe run` runs generate -> evaluate with one epoch of
training, in a fresh project folder and a process of its own, with nothing else set: Spark local mode, its
memory sized by dlpipe from this machine. While it runs, the process tree is sampled twice a second: the
driver JVM (which in local mode is also every executor) and the Python processes (the driver, Spark's
Python workers, the training ranks), by proportional set size so that forked workers' shared pages count
once. Each sample counts toward the stage the run's log says is running.

Printed per size and stage: seconds, rows/s (the stage's own rows: lines generated, rows read, samples
trained, rows scored) and peak memory (MB) of the JVM and of the Python processes. Then:
- scale_time_per_row_ratio: the whole run's seconds per row at the largest size over the smallest (goal
  <= 1.3: time grows linearly with rows);
- scale_peak_memory_ratio: peak memory (JVM + Python) at the largest size over the smallest (goal <= 1.3:
  memory stays flat);
- train_vs_torch: the pipeline's training samples/s at the largest size (all ranks) over one process of
  plain PyTorch training the same model with the same batch size on tensors already in memory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path("data/bench/scale-root").resolve()
MB = 1024**2
STARTED = re.compile(r"pipeline: stage \d+/\d+: (\w+)")
DONE = re.compile(r"stage (\w+): done in ([\d.]+)s (\{.*\})")


def _memory(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except (psutil.AccessDenied, AttributeError):
        return proc.memory_info().rss


class TreeSampler(threading.Thread):
    """Peak memory of a process tree's JVMs and Python processes, per stage of the pipeline."""

    def __init__(self, pid: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = psutil.Process(pid), interval
        self.stage = "start"
        self.peaks: dict[str, dict[str, int]] = defaultdict(lambda: {"jvm": 0, "python": 0, "total": 0})
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            jvm = python = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                try:
                    name = p.name()
                    if name == "java":
                        jvm += _memory(p)
                    elif name.startswith("python"):
                        python += _memory(p)
                except psutil.NoSuchProcess:
                    continue
            peak = self.peaks[self.stage]
            peak["jvm"], peak["python"] = max(peak["jvm"], jvm), max(peak["python"], python)
            peak["total"] = max(peak["total"], jvm + python)
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self.join()


def _metrics(logged: str) -> dict:
    """A stage's metrics as its log line printed them (a dict repr, which may hold nan)."""
    return eval(logged, {"__builtins__": {}}, {"nan": float("nan"), "inf": float("inf")})  # our own log line


def _stage_rows(stage: str, metrics: dict, train_rows: int) -> float:
    return {
        "generate": metrics.get("rows_written", 0),
        "ingest": metrics.get("rows_in", 0),
        "preprocess": metrics.get("rows_in", 0),
        "train": train_rows * metrics.get("epochs_run", 0),
        "infer": metrics.get("rows_in", 0),
        "evaluate": metrics.get("test_rows", 0),
    }.get(stage, 0)


def run_pipeline(rows: int) -> dict:
    """One whole run at `rows`; returns per stage its seconds, metrics and peak memory, and the whole."""
    root = ROOT / f"rows-{rows}"
    shutil.rmtree(root, ignore_errors=True)
    cmd = [sys.executable, "-m", "dlpipe", "run", f"project.root={root}", f"dataset.generator.rows={rows}"]
    cmd.append("train.epochs=1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stages: dict[str, dict] = {}
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        tail = [*tail[-40:], line.rstrip()]
        if m := STARTED.search(line):
            sampler.stage = m.group(1)
            print(f"# {rows} rows: {m.group(1)} ...", flush=True)
        elif m := DONE.search(line):
            stages[m.group(1)] = {"seconds": float(m.group(2)), "metrics": _metrics(m.group(3))}
    rc = proc.wait()
    seconds = time.perf_counter() - started
    sampler.stop()
    if rc != 0:
        raise RuntimeError(f"the pipeline at {rows} rows failed (exit {rc}):\n" + "\n".join(tail))
    for name, stage in stages.items():
        stage["peak"] = dict(sampler.peaks.get(name, {"jvm": 0, "python": 0, "total": 0}))
    whole = {k: max(p[k] for p in sampler.peaks.values()) for k in ("jvm", "python", "total")}
    return {"rows": rows, "seconds": seconds, "stages": stages, "peak": whole}


def torch_samples_per_s(model_cfg: dict, dim: int, classes: int, batch: int, lr: float, rows: int = 400_000) -> float:
    """Plain PyTorch in one process (default threads) on tensors in memory: the same model, batch and
    optimizer as the pipeline's training, no data loading, no framework."""
    import torch

    from dlpipe.train.models import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg, (dim,), classes)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(rows, dim), torch.randint(0, classes, (rows,))
    rates = []
    for _ in range(2):  # the first pass warms up
        t0 = time.perf_counter()
        for i in range(0, rows, batch):
            opt.zero_grad()
            loss_fn(model(x[i : i + batch]), y[i : i + batch]).backward()
            opt.step()
        rates.append(rows / (time.perf_counter() - t0))
    return rates[-1]


def run() -> dict[str, float]:
    from dlpipe.config import load_config

    sizes = [int(s) for s in os.environ.get("BENCH_SCALE_ROWS", "2000000,6000000,20000000").split(",") if s]
    figures: dict[str, float] = {}
    runs = []
    for rows in sorted(sizes):
        r = run_pipeline(rows)
        runs.append(r)
        train_rows = r["stages"].get("preprocess", {}).get("metrics", {}).get("rows_train", 0)
        for name, stage in r["stages"].items():
            n = _stage_rows(name, stage["metrics"], train_rows)
            figures[f"scale_{rows}_{name}_seconds"] = stage["seconds"]
            figures[f"scale_{rows}_{name}_rows_per_s"] = n / max(stage["seconds"], 1e-9)
            figures[f"scale_{rows}_{name}_peak_jvm_mb"] = stage["peak"]["jvm"] / MB
            figures[f"scale_{rows}_{name}_peak_python_mb"] = stage["peak"]["python"] / MB
        figures[f"scale_{rows}_seconds"] = r["seconds"]
        figures[f"scale_{rows}_rows_per_s"] = rows / r["seconds"]
        figures[f"scale_{rows}_peak_jvm_mb"] = r["peak"]["jvm"] / MB
        figures[f"scale_{rows}_peak_python_mb"] = r["peak"]["python"] / MB
        figures[f"scale_{rows}_peak_total_mb"] = r["peak"]["total"] / MB
        print(f"# {rows} rows: {r['seconds']:.0f}s, peak {r['peak']['total'] / MB:.0f} MB", flush=True)
    small, large = runs[0], runs[-1]
    figures["scale_time_per_row_ratio"] = (large["seconds"] / large["rows"]) / (small["seconds"] / small["rows"])
    figures["scale_peak_memory_ratio"] = large["peak"]["total"] / small["peak"]["total"]
    figures["scale_peak_jvm_ratio"] = large["peak"]["jvm"] / small["peak"]["jvm"]
    figures["scale_peak_python_ratio"] = large["peak"]["python"] / small["peak"]["python"]

    cfg = load_config("local", [f"project.root={ROOT}"])
    train = large["stages"]["train"]["metrics"]
    pipeline_rate = train["samples_per_s_per_rank"] * train["ranks"]
    dim = int(large["stages"]["preprocess"]["metrics"]["feature_dim"])
    model_cfg = cfg.train.model.model_dump(mode="json")
    torch_rate = torch_samples_per_s(model_cfg, dim, cfg.dataset.num_classes, cfg.train.batch_size, cfg.train.lr)
    figures["train_samples_per_s"] = pipeline_rate
    figures["torch_1proc_samples_per_s"] = torch_rate
    figures["train_vs_torch"] = pipeline_rate / torch_rate
    return figures
