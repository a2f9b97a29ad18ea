"""The candidate compiled to ONNX and scored with ONNX Runtime, behind the network's interface.

`OnnxModule` is called like the network (float32 features in, probabilities or values out), so the
raw-record model, the batch scorer (udfs/score.py), the gate and serving take it unchanged. ONNX Runtime
runs on one intra-op thread per Spark task (DLPIPE_SCORING_THREADS raises it), as torch does there. Light to
import: onnxruntime is loaded when a session is first needed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch

ONNX_FILE = "model.onnx"
INPUT, OUTPUT = "features", "scores"


def export(served: torch.nn.Module, example: np.ndarray) -> OnnxModule:
    """The served network in inference form (its outputs as registered: probabilities, or values in the
    label's units) as ONNX, with any number of rows per call."""
    import warnings

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notice
        torch.onnx.export(
            _Held(served),
            torch.from_numpy(np.ascontiguousarray(example, dtype=np.float32)),
            buf,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "rows"}, OUTPUT: {0: "rows"}},
            dynamo=False,  # the TorchScript exporter: no onnxscript needed, and it handles these models
        )
    return OnnxModule(buf.getvalue())


class _Held(torch.nn.Module):
    """model held outside the module tree: the exporter switches modes (train/eval), which a torch.export
    program (how MLflow 3 saves the candidate) refuses; tracing only calls it."""

    def __init__(self, model):
        super().__init__()
        object.__setattr__(self, "held", model)  # not a submodule: mode switches do not reach it
        for p in model.parameters():  # its weights become the graph's constants
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.held(x)


class OnnxModule(torch.nn.Module):
    """An ONNX model (its serialized bytes) as a torch module, run by an ONNX Runtime CPU session."""

    def __init__(self, model_bytes: bytes):
        super().__init__()
        self.model_bytes = model_bytes
        self._session = None
        self._threads = 0

    def _session_for(self, threads: int):
        if self._session is None or self._threads != threads:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self.model_bytes, options, providers=["CPUExecutionProvider"])
            self._threads = threads
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        threads = int(os.environ.get("DLPIPE_SCORING_THREADS", "1"))
        feed = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self._session_for(threads).run([OUTPUT], {INPUT: feed})[0])

    def save(self, folder: Path) -> Path:
        path = Path(folder) / ONNX_FILE
        path.write_bytes(self.model_bytes)
        return path

    @classmethod
    def load(cls, path: str | Path) -> OnnxModule:
        return cls(Path(path).read_bytes())

    def size_bytes(self) -> int:
        return len(self.model_bytes)

    def __getstate__(self) -> dict:  # the session is rebuilt where the module lands
        state = self.__dict__.copy()
        state["_session"] = None
        return state
