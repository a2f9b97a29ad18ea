"""A pyarrow filesystem over WebHDFS, for Python-side reads and writes of hdfs:// data.

pyarrow's own HadoopFileSystem needs libhdfs.so (a native Hadoop build no registry ships), and WebHDFS needs
nothing but HTTP, so this wraps HdfsCLI's `InsecureClient` (simple auth, user given as `user.name`) in a
`pyarrow.fs.FileSystemHandler`. Paths are plain absolute HDFS paths such as `/dlpipe/x.parquet`.
"""

from __future__ import annotations

import io
import posixpath
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from hdfs import HdfsError, InsecureClient
from pyarrow.fs import FileInfo, FileSelector, FileSystem, FileSystemHandler, FileType, PyFileSystem

# Smallest ranged read: a sequential reader asking for a few KB at a time must not cost one HTTP round trip each.
_MIN_FETCH = 1 << 20
# Output streams spool in memory up to this size, then on local disk, and upload when closed.
_SPOOL_IN_MEMORY = 32 << 20


def webhdfs_filesystem(url: str, user: str | None = None, timeout: float = 60.0) -> FileSystem:
    """A pyarrow FileSystem on the WebHDFS endpoint `url` (e.g. `http://namenode:9870`), acting as `user`.

    `user` None means the local login name (HdfsCLI's default). Works with `pyarrow.parquet` and `pyarrow.dataset`.
    """
    return PyFileSystem(WebHdfsHandler(url, user=user, timeout=timeout))


def _abs(path: str) -> str:
    """HDFS path for the REST calls: always absolute (WebHDFS would resolve relative paths against /user/NAME)."""
    stripped = path.strip("/")
    return "/" + stripped if stripped else "/"


def _info(path: str, status: dict[str, Any]) -> FileInfo:
    mtime_ns = int(status["modificationTime"]) * 1_000_000
    if status["type"] == "DIRECTORY":
        return FileInfo(path, FileType.Directory, mtime_ns=mtime_ns)
    if status["type"] == "FILE":
        return FileInfo(path, FileType.File, size=int(status["length"]), mtime_ns=mtime_ns)
    return FileInfo(path, FileType.Unknown, mtime_ns=mtime_ns)


class _RangedReader(io.RawIOBase):
    """Seekable read-only file: each read is a WebHDFS OPEN with offset and length (what Parquet footers need)."""

    def __init__(self, client: InsecureClient, path: str, size: int) -> None:
        super().__init__()
        self._client = client
        self._path = path
        self._size = size
        self._pos = 0
        self._buf = b""
        self._buf_start = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def size(self) -> int:
        return self._size

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(f"negative seek position {pos} in {self._path}")
        self._pos = pos
        return pos

    def _fetch(self, offset: int, length: int) -> bytes:
        with self._client.read(self._path, offset=offset, length=length) as reader:
            data = reader.read()
        if len(data) != length:
            raise OSError(f"short read from {self._path}: {len(data)} of {length} bytes at offset {offset}")
        return data

    def read(self, size: int | None = -1) -> bytes:
        self._checkClosed()
        end = self._size if size is None or size < 0 else min(self._size, self._pos + size)
        if end <= self._pos:
            return b""
        buf_end = self._buf_start + len(self._buf)
        if not (self._buf_start <= self._pos and end <= buf_end):
            # Fetch at least _MIN_FETCH bytes (up to the end of the file) and keep them for the next reads.
            length = min(self._size - self._pos, max(end - self._pos, _MIN_FETCH))
            self._buf, self._buf_start = self._fetch(self._pos, length), self._pos
        data = self._buf[self._pos - self._buf_start : end - self._buf_start]
        self._pos = end
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)


class _SpooledWriter(io.RawIOBase):
    """Write-only stream that uploads on close: WebHDFS CREATE (or APPEND) takes the whole body in one request."""

    def __init__(self, client: InsecureClient, path: str, append: bool) -> None:
        super().__init__()
        self._client = client
        self._path = path
        self._append = append
        self._spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
        self._written = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._written

    def write(self, data: Any) -> int:
        self._checkClosed()
        n = self._spool.write(data)
        self._written += n
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._spool.seek(0)
            if self._append:
                self._client.write(self._path, data=self._spool, append=True)
            else:
                self._client.write(self._path, data=self._spool, overwrite=True)
        finally:
            self._spool.close()
            super().close()


class WebHdfsHandler(FileSystemHandler):
    """The `FileSystemHandler` behind `webhdfs_filesystem`; one REST call (or a few) per operation."""

    def __init__(self, url: str, user: str | None = None, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.user = user
        self.timeout = timeout
        self.client = InsecureClient(self.url, user=user, timeout=timeout)

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle the endpoint, not the HTTP session, so the filesystem can be shipped to Spark executors.
        return (WebHdfsHandler, (self.url, self.user, self.timeout))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WebHdfsHandler):
            return (self.url, self.user) == (other.url, other.user)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.url, self.user))

    def get_type_name(self) -> str:
        return "webhdfs"

    def normalize_path(self, path: str) -> str:
        return _abs(path)

    # --- metadata ------------------------------------------------------------------------------------------------
    def _status(self, path: str) -> dict[str, Any] | None:
        return self.client.status(_abs(path), strict=False)

    def get_file_info(self, paths: list[str]) -> list[FileInfo]:
        infos = []
        for path in paths:
            status = self._status(path)
            infos.append(FileInfo(path, FileType.NotFound) if status is None else _info(path, status))
        return infos

    def _walk(self, base: str, recursive: bool) -> Iterator[FileInfo]:
        for name, status in self.client.list(_abs(base), status=True):
            child = f"{base}/{name}" if base else f"/{name}"
            yield _info(child, status)
            if recursive and status["type"] == "DIRECTORY":
                yield from self._walk(child, recursive)

    def get_file_info_selector(self, selector: FileSelector) -> list[FileInfo]:
        status = self._status(selector.base_dir)
        if status is None:
            if selector.allow_not_found:
                return []
            raise FileNotFoundError(f"{selector.base_dir}: no such directory on {self.url}")
        if status["type"] != "DIRECTORY":
            raise NotADirectoryError(f"{selector.base_dir} is not a directory on {self.url}")
        # Children are named under base_dir as the caller spelled it: pyarrow.dataset strips that prefix.
        return list(self._walk(selector.base_dir.rstrip("/"), selector.recursive))

    # --- directories and files -----------------------------------------------------------------------------------
    def create_dir(self, path: str, recursive: bool) -> None:
        status = self._status(path)
        if status is not None:
            if status["type"] != "DIRECTORY":
                raise FileExistsError(f"{path} exists and is not a directory")
            return
        parent = posixpath.dirname(_abs(path))
        if not recursive and (parent_status := self._status(parent)) is None:
            raise FileNotFoundError(f"parent directory {parent} of {path} does not exist")
        if not recursive and parent_status is not None and parent_status["type"] != "DIRECTORY":
            raise NotADirectoryError(f"parent {parent} of {path} is not a directory")
        self.client.makedirs(_abs(path))

    def _require(self, path: str, kind: str | None = None) -> dict[str, Any]:
        """The path's status; FileNotFoundError (or Not/IsADirectoryError) when it is missing or the wrong kind."""
        status = self._status(path)
        if status is None:
            raise FileNotFoundError(f"{path}: not found on {self.url}")
        if kind == "DIRECTORY" and status["type"] != "DIRECTORY":
            raise NotADirectoryError(f"{path} is not a directory")
        if kind == "FILE" and status["type"] == "DIRECTORY":
            raise IsADirectoryError(f"{path} is a directory")
        return status

    def delete_dir(self, path: str) -> None:
        if _abs(path) == "/":
            raise ValueError("refusing to delete the root directory")
        self._require(path, "DIRECTORY")
        self.client.delete(_abs(path), recursive=True)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        if _abs(path) == "/":
            raise ValueError("delete_dir_contents on '/': use delete_root_dir_contents")
        if missing_dir_ok and self._status(path) is None:
            return
        self._require(path, "DIRECTORY")
        for name in self.client.list(_abs(path)):
            self.client.delete(posixpath.join(_abs(path), name), recursive=True)

    def delete_root_dir_contents(self) -> None:
        for name in self.client.list("/"):
            self.client.delete("/" + name, recursive=True)

    def delete_file(self, path: str) -> None:
        self._require(path, "FILE")
        self.client.delete(_abs(path))

    def move(self, src: str, dest: str) -> None:
        """Rename; an existing destination file is replaced (delete, then rename: not atomic)."""
        self._require(src)
        status = self._status(dest)
        if status is not None:
            if status["type"] == "DIRECTORY":
                # HDFS would move src *into* it; pyarrow's contract is to fail.
                raise IsADirectoryError(f"cannot move {src} onto existing directory {dest}")
            self.client.delete(_abs(dest))
        try:
            self.client.rename(_abs(src), _abs(dest))
        except HdfsError as exc:
            raise OSError(f"cannot move {src} to {dest} on {self.url}: {exc}") from exc

    def copy_file(self, src: str, dest: str) -> None:
        self._require(src, "FILE")
        with self.client.read(_abs(src)) as reader:
            self.client.write(_abs(dest), data=reader, overwrite=True)

    # --- streams ------------------------------------------------------------------------------------------------
    def open_input_file(self, path: str) -> pa.NativeFile:
        status = self._require(path, "FILE")
        return pa.PythonFile(_RangedReader(self.client, _abs(path), int(status["length"])), mode="r")

    def open_input_stream(self, path: str) -> pa.NativeFile:
        return self.open_input_file(path)

    def open_output_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        return pa.PythonFile(_SpooledWriter(self.client, _abs(path), append=False), mode="w")

    def open_append_stream(self, path: str, metadata: Any = None) -> pa.NativeFile:
        self._require(path, "FILE")
        return pa.PythonFile(_SpooledWriter(self.client, _abs(path), append=True), mode="w")
