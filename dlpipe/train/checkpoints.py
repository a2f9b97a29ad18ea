"""Training checkpoints on the configured store (file, HDFS or S3), one per epoch.

Written by rank 0 at the end of every epoch; each file is written whole before `latest.json` points at
it, so a rank killed at any moment leaves either the previous checkpoint or the new one, never half of
one. The last two are kept.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

import pyarrow.fs as pafs
import torch

from dlpipe.storage import StorageSettings, python_fs

LATEST = "latest.json"
KEEP = 2


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
