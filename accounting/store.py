"""Where the ledger's files live: a local directory or any `pyarrow.fs` filesystem.

`LedgerStore` is the seam: the writer, the compactor and the verifier only ever
write whole files atomically, read them, list them and delete them, by paths relative
to the data directory (`ledger/events/day=2025-01-31/<name>.parquet`).

- `LocalStore`: writes to a hidden temporary name in the target directory, fsyncs it,
  renames it into place and fsyncs the directory, so a reader never sees half a file
  and a crash never leaves one.
- `ArrowFsStore`: any `pyarrow.fs.FileSystem` (`s3://`, `gs://`, `hdfs://`, ...).
  Object stores publish a whole object atomically, so they are written directly;
  other filesystems get the temporary name and a move. Durability is the filesystem's.

`open_store(data_dir)` picks one from a path or URI.
"""

from __future__ import annotations

import contextlib
import errno
import os
import uuid
from pathlib import Path, PurePosixPath
from typing import Protocol

import pyarrow as pa
import pyarrow.fs as pafs

from accounting.errors import LedgerError

__all__ = ["ArrowFsStore", "LedgerStore", "LocalStore", "open_store"]

_OBJECT_STORES = {"s3", "gcs", "abfs"}


class LedgerStore(Protocol):
    """Whole-file storage under one data directory; paths are relative, `/`-separated."""

    location: str

    def write_atomic(self, path: str, data: bytes | memoryview, *, exclusive: bool = False) -> None:
        """Publish `data` at `path` in one step; `exclusive` refuses to replace a file."""

    def read_bytes(self, path: str) -> bytes:
        """The whole file."""

    def list_files(self, directory: str, suffix: str = "") -> list[str]:
        """Every visible file below `directory` (recursively) ending in `suffix`, sorted."""

    def exists(self, path: str) -> bool:
        """Whether a file is at `path`."""

    def delete(self, path: str) -> None:
        """Remove one file."""

    def arrow(self) -> tuple[pafs.FileSystem, str]:
        """A pyarrow filesystem and the data directory's path in it (for Parquet readers)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _link_exclusive(tmp: Path, final: Path) -> None:
    """Publish `tmp` as `final` unless `final` exists (a hard link is atomic about that)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as e:  # no hard links on this filesystem: check, then rename
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():
            raise FileExistsError(final) from None
        os.replace(tmp, final)


class LocalStore:
    """A data directory on a local (or mounted) filesystem, fsynced."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.location = str(self.root)

    def _path(self, path: str) -> Path:
        return self.root.joinpath(*PurePosixPath(path).parts)

    def _ensure_dir(self, directory: Path) -> None:
        if directory.is_dir():
            return
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        directory.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):  # make each new entry durable in its parent
            _fsync_dir(created.parent)

    def write_atomic(self, path: str, data: bytes | memoryview, *, exclusive: bool = False) -> None:
        final = self._path(path)
        self._ensure_dir(final.parent)
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                _link_exclusive(tmp, final)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
        except FileExistsError:
            raise LedgerError(
                f"{final}: already exists; refusing to overwrite a ledger file "
                f"(fix: another writer uses the same chain_id; give each writer its own)"
            ) from None
        except OSError as e:
            raise LedgerError(
                f"{final}: cannot write: {e.strerror} (fix: check free space and permissions)"
            ) from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def read_bytes(self, path: str) -> bytes:
        return self._path(path).read_bytes()

    def list_files(self, directory: str, suffix: str = "") -> list[str]:
        base = self._path(directory)
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(".") or not name.endswith(suffix):
                    continue
                out.append(f"{rel_dir}/{name}")
        return sorted(out)

    def exists(self, path: str) -> bool:
        return self._path(path).is_file()

    def delete(self, path: str) -> None:
        target = self._path(path)
        target.unlink()
        _fsync_dir(target.parent)

    def arrow(self) -> tuple[pafs.FileSystem, str]:
        return pafs.LocalFileSystem(), str(self.root)


class ArrowFsStore:
    """A data directory on any pyarrow filesystem (object stores, HDFS, ...)."""

    def __init__(self, fs: pafs.FileSystem, base: str, location: str | None = None) -> None:
        self.fs = fs
        self.base = base.rstrip("/")
        self.location = location or f"{fs.type_name}:{self.base}"
        self._direct = fs.type_name in _OBJECT_STORES

    def _path(self, path: str) -> str:
        return f"{self.base}/{path}" if self.base else path

    def write_atomic(self, path: str, data: bytes | memoryview, *, exclusive: bool = False) -> None:
        final = self._path(path)
        parent = final.rsplit("/", 1)[0]
        try:
            if exclusive and self.exists(path):
                raise LedgerError(
                    f"{final}: already exists; refusing to overwrite a ledger file "
                    f"(fix: give each writer its own chain_id)"
                )
            self.fs.create_dir(parent, recursive=True)
            target = final
            if not self._direct:
                name = final.rsplit("/", 1)[-1]
                target = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
            with self.fs.open_output_stream(target) as out:
                out.write(pa.py_buffer(data))
            if target != final:
                self.fs.move(target, final)
        except (OSError, pa.ArrowException) as e:
            raise LedgerError(
                f"{self.location}/{path}: cannot write: {e} (fix: check access)"
            ) from e

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(self._path(path)) as f:
            return bytes(f.read())

    def list_files(self, directory: str, suffix: str = "") -> list[str]:
        selector = pafs.FileSelector(self._path(directory), recursive=True, allow_not_found=True)
        out = []
        prefix_len = len(self.base) + 1 if self.base else 0
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            rel = info.path[prefix_len:]
            if any(part.startswith(".") for part in rel.split("/")) or not rel.endswith(suffix):
                continue
            out.append(rel)
        return sorted(out)

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(self._path(path)).type == pafs.FileType.File

    def delete(self, path: str) -> None:
        self.fs.delete_file(self._path(path))

    def arrow(self) -> tuple[pafs.FileSystem, str]:
        return self.fs, self.base


def open_store(data_dir: str | os.PathLike[str] | LedgerStore) -> LedgerStore:
    """The store for a data directory: a local path, `file://...`, any pyarrow URI, or a
    `LedgerStore` already (passed through)."""
    if not isinstance(data_dir, str | os.PathLike):
        return data_dir
    value = os.fspath(data_dir)
    if "://" not in value:
        return LocalStore(Path(value).expanduser())
    if value.startswith("file://"):
        return LocalStore(Path(value.removeprefix("file://")))
    try:
        fs, base = pafs.FileSystem.from_uri(value)
    except (pa.ArrowException, ValueError) as e:
        raise LedgerError(
            f"{value}: not a usable data directory URI: {e} (fix: use a local path or a "
            f"pyarrow filesystem URI such as s3://bucket/prefix)"
        ) from e
    return ArrowFsStore(fs, base, location=value)
