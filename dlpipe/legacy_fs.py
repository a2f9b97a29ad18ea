"""pyarrow's legacy filesystem API over any fsspec filesystem, for Petastorm 0.13's metadata code.

Petastorm reads and writes its dataset metadata through pyarrow's legacy `ParquetDataset`, which only
accepts legacy `pyarrow.filesystem` objects. pyarrow's own `DaskFileSystem` wrapper leaves `isdir` and
`isfile` unimplemented; this fills them in from fsspec. Kept in its own module because importing
`pyarrow.filesystem` warns that it is deprecated (it is, which is why pyarrow is pinned to 14).
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from pyarrow.filesystem import DaskFileSystem


class FsspecLegacyFileSystem(DaskFileSystem):
    def __init__(self, fs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            super().__init__(fs)

    def isdir(self, path) -> bool:
        return bool(self.fs.isdir(str(path)))

    def isfile(self, path) -> bool:
        return bool(self.fs.isfile(str(path)))
