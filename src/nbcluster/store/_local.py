"""An object store in a local (or shared, e.g. NFS) directory."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from pathlib import Path

from ._interface import ObjectCorruptedError, ObjectNotFoundError, StoreError, validate_key

__all__ = ["LocalDirectoryStore"]

#: Every object file starts with this, then the BLAKE2b-256 digest of the data, then the data.
MAGIC = b"NBCOBJ1\n"
_DIGEST_SIZE = 32
_HEADER = len(MAGIC) + _DIGEST_SIZE
_TEMP_PREFIX = ".tmp-"


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=_DIGEST_SIZE).digest()


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
        data = bytes(data)
        tmp: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=target.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(_digest(data))
                f.write(data)
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
            raw = source.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFoundError(key) from None
        except OSError as exc:
            raise StoreError(f"could not read object {key!r} from {source}: {exc}") from exc
        if len(raw) < _HEADER or not raw.startswith(MAGIC):
            raise ObjectCorruptedError(key, f"{source} is not an object file (bad header)")
        data = raw[_HEADER:]
        if _digest(data) != raw[len(MAGIC) : _HEADER]:
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
