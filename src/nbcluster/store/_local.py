"""An object store in a local (or shared, e.g. NFS) directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import xxhash

from ._interface import (
    ObjectCorruptedError,
    ObjectInfo,
    ObjectNotFoundError,
    StoreError,
    validate_key,
)

__all__ = ["LocalDirectoryStore"]

#: Every object file starts with a magic line naming its checksum, then the checksum of the
#: data, then the data. Version 2 (written now): XXH3-128, which checks 100 MB in ~10 ms;
#: version 1 (BLAKE2b-256, ~150 ms per 100 MB) is still read.
MAGIC = b"NBCOBJ2\n"
MAGIC_V1 = b"NBCOBJ1\n"
_DIGEST_SIZE = 16
_DIGEST_SIZE_V1 = 32
_HEADER = len(MAGIC) + _DIGEST_SIZE
_TEMP_PREFIX = ".tmp-"


def _digest(data: bytes | memoryview) -> bytes:
    return xxhash.xxh3_128_digest(data)


def _digest_v1(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE_V1).digest()


class LocalDirectoryStore:
    """:class:`~nbcluster.store.ObjectStore` keeping each object as one file under ``path``
    (a key's ``/`` segments become subdirectories).

    * Writes are atomic: the object goes to a temporary file in the same directory (named
      ``.tmp-*``, which no key can be), which is then renamed over the final name, so a reader
      sees the old object, no object, or the whole new one; never a part.
    * Each file carries a checksum of its data, verified on every read: a truncated or
      altered file raises :class:`~nbcluster.store.ObjectCorruptedError` naming the key.
    * With ``fsync`` (the default) the data and the directory entry are flushed to disk before
      ``put`` returns, so an object survives a crash of the machine once ``put`` returned.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"cannot create the object store directory {self.path}: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({str(self.path)!r})"

    def _file(self, key: str) -> Path:
        return self.path.joinpath(*validate_key(key).split("/"))

    def put(self, key: str, data: bytes) -> None:
        target = self._file(key)
        view = memoryview(data).cast("B")
        tmp: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=target.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(_digest(view))
                f.write(view)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
            if self.fsync:
                self._fsync_directory(target.parent)
        except OSError as exc:
            raise StoreError(f"could not write object {key!r} to {target}: {exc}") from exc
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    @staticmethod
    def _fsync_directory(directory: Path) -> None:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes:
        source = self._file(key)
        try:
            # Unbuffered, and the rest read with its size known: the data lands in its final
            # bytes object in one pass (a buffered read of "the rest" copies it twice).
            with source.open("rb", buffering=0) as f:
                magic = f.read(len(MAGIC)) or b""
                size = _DIGEST_SIZE_V1 if magic == MAGIC_V1 else _DIGEST_SIZE
                expected = f.read(size) or b""
                remaining = os.fstat(f.fileno()).st_size - len(magic) - len(expected)
                data = f.read(max(remaining, 0)) or b""
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        except OSError as exc:
            raise StoreError(f"could not read object {key!r} from {source}: {exc}") from exc
        if magic not in (MAGIC, MAGIC_V1) or len(expected) != size:
            raise ObjectCorruptedError(key, f"{source} is not an object file (bad header)")
        actual = _digest_v1(data) if magic == MAGIC_V1 else _digest(data)
        if actual != expected:
            raise ObjectCorruptedError(key, f"checksum mismatch in {source}")
        return data

    def delete(self, key: str) -> None:
        target = self._file(key)
        try:
            target.unlink(missing_ok=True)
        except IsADirectoryError:
            pass  # a key prefix, not an object: nothing stored under this key
        except OSError as exc:
            raise StoreError(f"could not delete object {key!r} ({target}): {exc}") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        found = []
        for path in self.path.rglob("*"):
            name = path.relative_to(self.path).as_posix()
            if any(part.startswith(".") for part in path.relative_to(self.path).parts):
                continue  # temporaries of writes in progress
            if name.startswith(prefix) and path.is_file():
                with contextlib.suppress(OSError):
                    found.append(ObjectInfo(name, max(path.stat().st_size - _HEADER, 0)))
        return iter(sorted(found, key=lambda info: info.key))

    def remove_stale_temporaries(self, older_than: float = 3600.0) -> int:
        """Remove temporary files left by writers that died mid-``put`` (older than
        ``older_than`` seconds, so that writes in progress are left alone). Returns how many."""
        cutoff = time.time() - older_than
        removed = 0
        for tmp in self.path.rglob(f"{_TEMP_PREFIX}*"):
            with contextlib.suppress(OSError):
                if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
        return removed
