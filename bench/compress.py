"""Compress group: the candidate's variants on the built-in example, as the compress stage measures them.

In a fresh project folder, one `python -m dlpipe run --to compress` on the built-in example (30,000 rows,
train's defaults: an MLP 64-64 trained by 2 Horovod ranks) with every variant switched on: train's int8,
ONNX, structured pruning (compress.prune.sparsity, BENCH_PRUNE_SPARSITY, default 0.5) and a distilled
student (compress.distill.hidden, BENCH_DISTILL_HIDDEN, default [32]), the last two also compiled to ONNX.
Each is measured on the validation rows against the registered fp32 network.

Printed, per variant: `<variant>_accuracy_delta`, `<variant>_speedup` (single-thread rows/s over fp32's),
`<variant>_spark_speedup` (rows/s in the Spark scorer over fp32's, registered variants only),
`<variant>_size_ratio` (size on disk over fp32's) and `<variant>_registered` (within the 0.01 accuracy gate);
then `best_variant_speedup` among the registered ones, its `best_variant_spark_speedup`, `fp32_rows_per_s`
and `compress_seconds` (the stage alone, with the two trainings).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bench.tune import run_dlpipe

ROOT = Path("data/bench/compress-root").resolve()
VARIANTS = ("int8", "onnx", "prune", "prune-onnx", "distill", "distill-onnx")


def run() -> dict[str, float]:
    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    sparsity = os.environ.get("BENCH_PRUNE_SPARSITY", "0.5")
    hidden = os.environ.get("BENCH_DISTILL_HIDDEN", "[32]")
    m = run_dlpipe(
        ROOT,
        "--to",
        "compress",
        "quantize.enabled=true",
        "compress.onnx=true",
        f"compress.prune.sparsity={sparsity}",
        "compress.distill.enabled=true",
        f"compress.distill.hidden={hidden}",
    )["compress"]
    table = {r["variant"]: r for r in json.loads(next(ROOT.rglob("variants/variants.json")).read_text())}
    fp32 = table["fp32"]
    figures: dict[str, float] = {"fp32_rows_per_s": fp32["rows_per_s"], "fp32_accuracy": fp32["accuracy"]}
    for name in VARIANTS:
        r = table.get(name)
        if r is None:  # int8 joins only when train registered it
            continue
        figures[f"{name}_accuracy_delta"] = r["accuracy_delta"]
        figures[f"{name}_speedup"] = r["speedup"]
        figures[f"{name}_spark_speedup"] = r["spark_speedup"] or 0.0
        figures[f"{name}_size_ratio"] = r["size_bytes"] / fp32["size_bytes"]
        figures[f"{name}_registered"] = float(r["registered"])
    within = [table[n] for n in VARIANTS if n in table and table[n]["registered"]]
    if within:
        best = max(within, key=lambda r: r["speedup"])
        figures["best_variant"] = best["variant"]
        figures["best_variant_speedup"] = best["speedup"]
        figures["best_variant_spark_speedup"] = best["spark_speedup"]
    figures["compress_seconds"] = m["seconds"]
    return figures
