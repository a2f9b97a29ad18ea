"""The one function that turns a batch of features into predictions, shared by the UDF and serving.

Models are loaded once per Python process and cached by URI: a Spark Python worker is reused across
tasks, so a whole job loads each model once per worker, not once per batch or task. A reused worker also
runs a full `gc.collect()` after every task (pyspark's daemon does), which walks every object the process
holds: with torch and MLflow imported that is ~0.25 s of CPU per task, more than scoring 100k rows. So
once a model is loaded, what the process holds is frozen out of the collector (`gc.freeze`): it lives as
long as the worker anyway, and each task's collection then walks only what that task made.
"""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import torch

from dlpipe.tracking import Credentials, credentials_env

_MODELS: dict[tuple[str, str], torch.nn.Module] = {}
_LOCK = threading.Lock()
_LOADS = 0


def _in_spark_task() -> bool:
    from pyspark import TaskContext

    return TaskContext.get() is not None


def task_device() -> torch.device:
    """The GPU Spark assigned the running task (spark.task.resource.gpu.amount), else the CPU."""
    from pyspark import TaskContext

    ctx = TaskContext.get()
    gpus = ctx.resources().get("gpu") if ctx is not None else None
    if gpus is not None and gpus.addresses and torch.cuda.is_available():
        return torch.device("cuda", int(gpus.addresses[0]))
    return torch.device("cpu")


def load_model(
    model_uri: str,
    tracking_uri: str | None = None,
    device: torch.device | None = None,
    credentials: Credentials | None = None,
) -> torch.nn.Module:
    """The model at model_uri on device (default CPU), loaded once per process and device. credentials: the
    driver's MLflow credentials, used where this process's environment has none (an executor elsewhere)."""
    global _LOADS
    device = device or torch.device("cpu")
    with _LOCK:
        model = _MODELS.get((model_uri, str(device)))
        if model is None:
            import mlflow

            if tracking_uri:
                mlflow.set_tracking_uri(tracking_uri)
            from dlpipe.model.rawmodel import network_of

            with credentials_env(credentials):
                model = network_of(model_uri)  # a raw-record pyfunc's network, or a plain PyTorch model
            # MLflow 3 saves torch.export programs (no pickle); they come back as GraphModules that are
            # already in inference form and refuse .eval(). Pickled nn.Modules need it.
            if not isinstance(model, torch.fx.GraphModule):
                model.eval()
            if device.type != "cpu":
                model = model.to(device)
            _MODELS[(model_uri, str(device))] = model
            _LOADS += 1
            if _in_spark_task():  # a driver (tests, notebooks) keeps its collector as it was
                gc.collect()  # what the load left as garbage is freed, not frozen
                gc.freeze()
        return model


def loads_in_this_process() -> int:
    """How many times this process loaded a model (the once-per-worker promise, made checkable)."""
    return _LOADS


def predict_proba(model: torch.nn.Module, x: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """(n, features) float32 -> (n, classes) probabilities. device: the model's, when the caller knows it
    (load_model put it there); else it is looked up.

    One torch thread by default: Spark already runs one task per core, and more threads per task only
    fight each other. DLPIPE_SCORING_THREADS raises it where a task owns several cores.
    """
    threads = int(os.environ.get("DLPIPE_SCORING_THREADS", "1"))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    x_t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if device is None:
        device = next(iter(model.parameters()), x_t).device if hasattr(model, "parameters") else x_t.device
    with torch.inference_mode():
        return model(x_t.to(device)).cpu().numpy()
