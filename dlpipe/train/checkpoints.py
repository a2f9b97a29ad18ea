"""Training checkpoints on the configured store (file, HDFS or S3), one per epoch.

Written by rank 0 at the end of every epoch; each file is written whole before `latest.json` points at
it, so a rank killed at any moment leaves either the previous checkpoint or the new one, never half of
one. The last two are kept.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any, NamedTuple

import pyarrow.fs as pafs
import torch

from dlpipe.storage import StorageSettings, python_fs

LATEST = "latest.json"
KEEP = 2


@dataclass(frozen=True)
class ResumeState:
    """Where training stands after `epoch` (0: before the first): everything, besides the weights and the
    optimizer's state, that a run restarted from a checkpoint needs to go on as if it had never stopped.

    A value: each epoch makes a new one (`after_epoch`), so what is checkpointed is exactly what the loop
    goes on with. Stored in the checkpoint under the same keys as its fields."""

    epoch: int = 0
    history: tuple[dict, ...] = ()  # one record per finished epoch
    best_loss: float = math.inf  # the best validation loss so far
    bad_epochs: int = 0  # epochs since it last improved: early stopping's patience counter
    # the weights of the best epoch, on the CPU (neither compared nor shown: tensors)
    best_state: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def next_epoch(self) -> int:
        """The epoch training continues with."""
        return self.epoch + 1

    def after_epoch(
        self, record: dict, min_delta: float, weights: Callable[[], dict[str, torch.Tensor]]
    ) -> ResumeState:
        """The state once `record`'s epoch has ended: better by more than min_delta keeps its weights
        (`weights()`, called only then) and resets the patience counter; otherwise the counter grows."""
        history = (*self.history, record)
        if record["val_loss"] < self.best_loss - min_delta:
            return replace(
                self,
                epoch=record["epoch"],
                history=history,
                best_loss=record["val_loss"],
                bad_epochs=0,
                best_state=weights(),
            )
        return replace(self, epoch=record["epoch"], history=history, bad_epochs=self.bad_epochs + 1)

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs in a row without a better validation loss (0: never)."""
        return bool(patience) and self.bad_epochs >= patience

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's keys (plain lists and dicts: a checkpoint loads with weights_only)."""
        return {
            "epoch": self.epoch,
            "history": list(self.history),
            "best_loss": self.best_loss,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> ResumeState:
        """The state a checkpoint holds; keys it lacks keep their defaults here (one place)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in ckpt.items() if k in known}
        if "history" in values:
            values["history"] = tuple(values["history"])
        if "epoch" in values:
            values["epoch"] = int(values["epoch"])
        return cls(**values)


class Restored(NamedTuple):
    """A checkpoint, read back: where training stands, and the model's and optimizer's state_dicts."""

    state: ResumeState
    model: dict[str, Any]
    optimizer: dict[str, Any]


class CheckpointStore:
    def __init__(self, uri: str, storage: StorageSettings | None = None):
        self.uri = uri.rstrip("/")
        self._fs, self._root = python_fs(self.uri, storage)

    def _write(self, name: str, data: bytes) -> None:
        path = f"{self._root}/{name}"
        if isinstance(self._fs, pafs.S3FileSystem):  # an S3 PUT is atomic already, and S3 cannot rename
            with self._fs.open_output_stream(path) as f:
                f.write(data)
            return
        tmp = f"{self._root}/.{name}.tmp-{uuid.uuid4().hex[:8]}"
        with self._fs.open_output_stream(tmp) as f:
            f.write(data)
        self._fs.move(tmp, path)

    def _exists(self, name: str) -> bool:
        return self._fs.get_file_info(f"{self._root}/{name}").is_file

    def save(self, epoch: int, state: dict[str, Any]) -> str:
        self._fs.create_dir(self._root, recursive=True)
        buf = io.BytesIO()
        torch.save({**state, "epoch": epoch}, buf)
        name = f"epoch-{epoch:04d}.pt"
        self._write(name, buf.getvalue())
        self._write(LATEST, json.dumps({"epoch": epoch, "file": name}).encode())
        for old in range(epoch - KEEP, 0, -1):
            if not self._exists(f"epoch-{old:04d}.pt"):
                break
            self._fs.delete_file(f"{self._root}/epoch-{old:04d}.pt")
        return f"{self.uri}/{name}"

    def save_state(self, state: ResumeState, model: dict[str, Any], optimizer: dict[str, Any]) -> str:
        """Checkpoint the end of state.epoch: the weights, the optimizer's state and where training stands."""
        return self.save(state.epoch, {"model": model, "optimizer": optimizer, **state.to_checkpoint()})

    def restore(self) -> Restored | None:
        """The newest checkpoint as typed state, or None when training starts from scratch."""
        ckpt = self.latest()
        if ckpt is None:
            return None
        return Restored(ResumeState.from_checkpoint(ckpt), ckpt["model"], ckpt["optimizer"])

    def latest(self) -> dict[str, Any] | None:
        """The newest complete checkpoint, or None when there is none."""
        if not self._exists(LATEST):
            return None
        with self._fs.open_input_stream(f"{self._root}/{LATEST}") as f:
            pointer = json.loads(f.read())
        with self._fs.open_input_file(f"{self._root}/{pointer['file']}") as f:
            return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)

    def clear(self) -> None:
        if self._fs.get_file_info(self._root).type != pafs.FileType.NotFound:
            self._fs.delete_dir(self._root)
