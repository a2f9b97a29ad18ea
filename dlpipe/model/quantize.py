"""A dynamically quantized (int8) variant of the trained model: measured against the fp32 model on the
validation rows (accuracy delta, single-thread rows/s), and registered as its own model version, under
the alias `candidate-int8`, when it loses no more than quantize.max_accuracy_drop. `infer.variant: int8`
scores with it.

Dynamic quantization stores nn.Linear weights as int8 and quantizes activations on the fly: no
calibration data, CPU only (fbgemm/qnnpack kernels). The variant is saved as TorchScript, so loading it
needs torch and nothing of dlpipe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

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


def compare(
    fp32: nn.Module, int8: nn.Module, batches: Iterable[tuple[np.ndarray, np.ndarray]], task: str = "classification"
) -> dict[str, float]:
    """Quality (accuracy, or RMSE for regression) of both on every (x, y) batch, summed as they stream by
    (the validation split may be larger than memory), and single-thread speed on the first SPEED_ROWS rows."""
    regression = task == "regression"
    n, err32, err8, sample = 0, 0.0, 0.0, []
    kept = 0
    with torch.inference_mode():
        for x, y in batches:
            a, b = fp32(torch.from_numpy(x)).numpy(), int8(torch.from_numpy(x)).numpy()
            if regression:
                err32 += float(((a.reshape(-1) - y) ** 2).sum())
                err8 += float(((b.reshape(-1) - y) ** 2).sum())
            else:
                err32 += float((a.argmax(1) == y).sum())
                err8 += float((b.argmax(1) == y).sum())
            n += len(y)
            if kept < SPEED_ROWS:
                sample.append(x[: SPEED_ROWS - kept])
                kept += len(sample[-1])
    x = np.concatenate(sample)
    r32, r8 = rows_per_second(fp32, x), rows_per_second(int8, x)
    speed = {"int8_rows_per_s": r8, "fp32_rows_per_s": r32, "int8_speedup": r8 / r32}
    if regression:
        e32, e8 = float(np.sqrt(err32 / n)), float(np.sqrt(err8 / n))
        return {"int8_val_rmse": e8, "fp32_val_rmse": e32, "int8_rmse_increase": e8 / max(e32, 1e-12) - 1, **speed}
    a32, a8 = err32 / n, err8 / n
    return {"int8_val_accuracy": a8, "fp32_val_accuracy": a32, "int8_accuracy_delta": a8 - a32, **speed}
