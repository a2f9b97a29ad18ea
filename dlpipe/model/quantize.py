"""A dynamically quantized (int8) variant of the trained model: measured against the fp32 model on the
validation rows (accuracy delta, single-thread rows/s), and registered as its own model version, under
the alias `candidate-int8`, when it loses no more than quantize.max_accuracy_drop. `infer.variant: int8`
scores with it.

Dynamic quantization stores nn.Linear weights as int8 and quantizes activations on the fly: no
calibration data, CPU only (fbgemm/qnnpack kernels). The variant is saved as TorchScript, so loading it
needs torch and nothing of dlpipe. `measure` (quality and single-thread speed of several models on streamed
validation batches) serves this gate and the compress stage's comparison alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


def quantize_dynamic(model: nn.Module) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's notice that eager quantization moves to torchao
        q = torch.ao.quantization.quantize_dynamic(model.eval(), {nn.Linear}, dtype=torch.qint8)
    return torch.jit.script(q)


# Single-thread speed is timed on at most this many validation rows (quality is measured on all of them).
SPEED_ROWS = 100_000


def rows_per_second(model: nn.Module, x: np.ndarray, batch: int = 4096, min_rows: int = 200_000) -> float:
    """Single-thread scoring rate (what one Spark task gets), best of three passes over >= min_rows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    reps = max(1, -(-min_rows // len(x)))
    best = 0.0
    try:
        with torch.inference_mode():
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(reps):
                    for i in range(0, len(x), batch):
                        model(torch.from_numpy(x[i : i + batch]))
                best = max(best, reps * len(x) / (time.perf_counter() - started))
    finally:
        torch.set_num_threads(threads)
    return best


def quality(outputs: np.ndarray, y: np.ndarray, regression: bool) -> float:
    """The summed quality of one batch: correct answers, or squared error."""
    if regression:
        return float(((outputs.reshape(-1) - y) ** 2).sum())
    return float((outputs.argmax(1) == y).sum())


def measure(models: dict[str, Any], batches, regression: bool, speed_rows: int = SPEED_ROWS) -> dict[str, dict]:
    """Per model: its validation accuracy (or RMSE) over every (x, y) batch as they stream by, and its
    single-thread rows/s on the first speed_rows rows."""
    sums = dict.fromkeys(models, 0.0)
    n, sample, kept = 0, [], 0
    with torch.inference_mode():
        for x, y in batches:
            for name, model in models.items():
                sums[name] += quality(model(torch.from_numpy(x)).numpy(), y, regression)
            n += len(y)
            if kept < speed_rows:
                sample.append(x[: speed_rows - kept])
                kept += len(sample[-1])
    x = np.concatenate(sample)
    out = {}
    for name, model in models.items():
        value = float(np.sqrt(sums[name] / n)) if regression else sums[name] / n
        out[name] = {"rmse" if regression else "accuracy": value, "rows_per_s": rows_per_second(model, x)}
    return out


def compare(
    fp32: nn.Module, int8: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], task: str = "classification"
) -> dict[str, float]:
    """Quality (accuracy, or RMSE for regression) of both on every (x, y) batch, summed as they stream by
    (the validation split may be larger than memory), and single-thread speed on the first SPEED_ROWS rows."""
    regression = task == "regression"
    m = measure({"fp32": fp32, "int8": int8}, batches, regression)
    r32, r8 = m["fp32"]["rows_per_s"], m["int8"]["rows_per_s"]
    speed = {"int8_rows_per_s": r8, "fp32_rows_per_s": r32, "int8_speedup": r8 / r32}
    if regression:
        e32, e8 = m["fp32"]["rmse"], m["int8"]["rmse"]
        return {"int8_val_rmse": e8, "fp32_val_rmse": e32, "int8_rmse_increase": e8 / max(e32, 1e-12) - 1, **speed}
    a32, a8 = m["fp32"]["accuracy"], m["int8"]["accuracy"]
    return {"int8_val_accuracy": a8, "fp32_val_accuracy": a32, "int8_accuracy_delta": a8 - a32, **speed}
