"""Atomic file writes: readers see the old file or the new one, never half of one; and ``release_memory``, which
hands the memory a large read freed back to the system.

Every writer goes through ``atomic_path``: the content is written to a temporary name in the target's folder
(``.<name>.tmp-<pid>``), flushed to disk, then renamed over the target in one ``os.replace``. If the writer
fails (or is killed), the target is untouched and only a dot-file is left, which ``sweep_temporaries`` removes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error, fsync it and rename it onto
    ``path``. On error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_parquet(table, path: str | Path) -> None:
    """Write a pyarrow Table as parquet, atomically."""
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


class ParquetAppender:
    """A parquet file written one pyarrow Table at a time (a row group each), opened with the first one's schema;
    later tables are cast to it."""

    def __init__(self, path: str | Path) -> None:
        self.path, self.writer = Path(path), None

    def write(self, table) -> None:
        import pyarrow.parquet as pq

        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def atomic_symlink(target: str | Path, link: str | Path) -> None:
    """Point the symlink ``link`` at ``target`` (relative to the link's folder) with one rename."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}{TMP_MARK}{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def sweep_temporaries(folder: str | Path) -> list[Path]:
    """Delete what interrupted atomic writes left in ``folder`` (its ``.<name>.tmp-<pid>`` files)."""
    gone = [p for p in Path(folder).glob(f".*{TMP_MARK}*") if p.is_file() or p.is_symlink()]
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def release_memory() -> None:
    """Return the memory freed since the last call to the system: Arrow's memory pool keeps the buffers of a
    finished read, and glibc's heap the small objects of a finished pandas conversion, as free space of the process.
    After a parquet read of a million-row training set they held 2.4 GiB (docs/experiment-log.md)."""
    import ctypes
    import ctypes.util
    import gc

    import pyarrow as pa

    gc.collect()
    pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    if libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)   # glibc only
        if trim is not None:
            trim(0)
