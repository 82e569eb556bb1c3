"""Object stores: LocalDirectoryStore (atomic files with checksums) and InMemoryStore."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nbcluster.store import (
    InMemoryStore,
    LocalDirectoryStore,
    ObjectCorruptedError,
    ObjectNotFoundError,
    ObjectStore,
    StoreError,
    validate_key,
)
from nbcluster.store._local import MAGIC

Factory = Callable[[Path], ObjectStore]

STORES: dict[str, Factory] = {
    "local": lambda path: LocalDirectoryStore(path / "store"),
    "local-nofsync": lambda path: LocalDirectoryStore(path / "store", fsync=False),
    "memory": lambda path: InMemoryStore(),
}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return STORES[request.param](tmp_path)


# -- every store --------------------------------------------------------------------------------


def test_put_get_delete(store: ObjectStore) -> None:
    store.put("k1", b"hello")
    store.put("kernels/abc/sync/0123", b"\x00" * 1000)
    store.put("empty", b"")
    assert store.get("k1") == b"hello"
    assert store.get("kernels/abc/sync/0123") == b"\x00" * 1000
    assert store.get("empty") == b""
    store.put("k1", b"replaced")
    assert store.get("k1") == b"replaced"
    store.delete("k1")
    with pytest.raises(ObjectNotFoundError):
        store.get("k1")
    store.delete("k1")  # deleting what is not there is fine
    assert store.get("kernels/abc/sync/0123") == b"\x00" * 1000


def test_a_missing_key_is_an_error_naming_it(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="'nothing/here'") as info:
        store.get("nothing/here")
    assert isinstance(info.value, StoreError)
    assert isinstance(info.value, LookupError)
    assert info.value.key == "nothing/here"


def test_a_key_prefix_is_not_an_object(store: ObjectStore) -> None:
    store.put("a/b", b"x")
    with pytest.raises(ObjectNotFoundError):
        store.get("a")
    store.delete("a")
    assert store.get("a/b") == b"x"


BAD_KEYS = ["", "/abs", "a/../b", "..", ".hidden", "a/.tmp-x", "a//b", "a/", "sp ace", "é", "a\\b"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_keys_every_backend_cannot_hold_are_refused(store: ObjectStore, key: str) -> None:
    for call in (lambda: store.put(key, b"x"), lambda: store.get(key), lambda: store.delete(key)):
        with pytest.raises(ValueError, match="invalid object key"):
            call()


def test_key_validation() -> None:
    assert validate_key("sync/0123abcd") == "sync/0123abcd"
    assert validate_key("a.b_c-d/e.f") == "a.b_c-d/e.f"
    with pytest.raises(ValueError, match="longer than"):
        validate_key("k" * 513)
    with pytest.raises(ValueError, match="must be a str"):
        validate_key(b"bytes")  # type: ignore[arg-type]


# -- LocalDirectoryStore -----------------------------------------------------------------------


def test_objects_are_files_under_the_directory(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path / "new" / "dir")
    store.put("kernels/k1/obj", b"data")
    file = tmp_path / "new" / "dir" / "kernels" / "k1" / "obj"
    assert file.is_file()
    assert file.read_bytes().endswith(b"data")
    assert repr(store) == f"LocalDirectoryStore({str(tmp_path / 'new' / 'dir')!r})"
    # another store on the same directory (another replica on a shared disk) sees it
    assert LocalDirectoryStore(tmp_path / "new" / "dir").get("kernels/k1/obj") == b"data"


def _object_file(store: LocalDirectoryStore, key: str) -> Path:
    return store.path.joinpath(*key.split("/"))


def test_a_flipped_byte_is_detected_naming_the_key(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.put("sync/abc", b"0123456789" * 100)
    file = _object_file(store, "sync/abc")
    raw = bytearray(file.read_bytes())
    raw[-50] ^= 0x01
    file.write_bytes(bytes(raw))
    with pytest.raises(ObjectCorruptedError, match=r"'sync/abc' is corrupt: checksum mismatch"):
        store.get("sync/abc")


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[:-1],  # truncated data
        lambda raw: raw[:20],  # truncated header
        lambda raw: b"",
        lambda raw: b"XXXXXXXX" + raw[8:],  # not our format
    ],
)
def test_truncated_or_foreign_files_are_corrupt(tmp_path: Path, damage: Any) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.put("k", b"payload")
    file = _object_file(store, "k")
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(ObjectCorruptedError, match="'k' is corrupt") as info:
        store.get("k")
    assert isinstance(info.value, StoreError)
    assert info.value.key == "k"


def test_a_failed_write_leaves_no_partial_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.put("k", b"old")

    def crash(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StoreError, match="could not write object 'k'"):
        store.put("k", b"new" * 1000)
    with pytest.raises(StoreError):
        store.put("fresh", b"new")
    monkeypatch.undo()
    assert store.get("k") == b"old"  # the old object, whole
    with pytest.raises(ObjectNotFoundError):
        store.get("fresh")  # no object at all, not part of one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary left behind


def test_the_object_appears_only_when_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalDirectoryStore(tmp_path, fsync=False)
    seen: list[tuple[bool, int]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        # just before the rename: the final name does not exist, the temporary is complete
        seen.append((Path(dst).exists(), Path(src).stat().st_size))
        assert Path(src).name.startswith(".tmp-")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store.put("k", b"x" * 4096)
    assert seen == [(False, 4096 + len(MAGIC) + 16)]


def test_readers_never_see_a_partial_object(tmp_path: Path) -> None:
    writer_store = LocalDirectoryStore(tmp_path, fsync=False)
    reader_store = LocalDirectoryStore(tmp_path, fsync=False)
    versions = [bytes([i]) * (256 * 1024 + i) for i in range(4)]
    writer_store.put("k", versions[0])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            writer_store.put("k", versions[i % len(versions)])

    thread = threading.Thread(target=write)
    thread.start()
    reads = 0
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                assert reader_store.get("k") in versions
            except BaseException as exc:
                errors.append(exc)
                break
            reads += 1
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert reads > 10


def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.put("a/k", b"x")
    old = tmp_path / "a" / ".tmp-old"
    new = tmp_path / "a" / ".tmp-new"
    old.write_bytes(b"partial")
    new.write_bytes(b"in progress")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert store.remove_stale_temporaries(older_than=3600) == 1
    assert not old.exists()
    assert new.exists()
    assert store.get("a/k") == b"x"


def test_an_unusable_directory_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StoreError, match="cannot create the object store directory"):
        LocalDirectoryStore(tmp_path / "file" / "store")
