"""The JobStore contract, run against both stores: FileJobStore in a temporary directory and
RedisJobStore on the Redis server at 127.0.0.1:6379, under a key prefix of each test's own
(removed afterwards). Then what is particular to each: file modes and leftovers, the Redis key
layout and an unreachable server."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from nbcluster.jobs._filestore import (
    LOG_LIMIT,
    TRUNCATED_NOTICE,
    FileJobStore,
    JobStoreError,
    truncated_notice,
)
from nbcluster.jobs._model import Job, JobResources, JobSpec
from nbcluster.jobs._redisstore import RedisJobStore
from nbcluster.jobs._store import JobStore

from ..cluster import free_port

BAD_IDS = ["", ".", "..", "../x", "a/b", "a\\b", "a.json", "a b", "é", "x" * 65, "a\x00b"]


@dataclass
class Backend:
    """One store kind under test. ``make`` opens a store on the same place each time (what a
    restarted gateway does); ``corrupt`` overwrites a job's stored record with garbage;
    ``leftovers`` lists what is stored there at all (files or keys)."""

    name: str
    make: Callable[..., JobStore]
    corrupt: Callable[[str], None]
    leftovers: Callable[[], list[str]]
    where: Callable[[str], str]
    opened: list[Any] = field(default_factory=list)


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis(host="127.0.0.1", port=6379)
    yield client
    client.close()


def _file_backend(tmp_path: Path) -> Backend:
    directory = tmp_path / "jobs"

    def make(**kwargs: Any) -> JobStore:
        return FileJobStore(directory, **kwargs)

    def corrupt(job_id: str) -> None:
        (directory / f"{job_id}.json").write_bytes(b"\x00garbage{not json")

    return Backend(
        "file",
        make,
        corrupt,
        lambda: sorted(p.name for p in directory.iterdir()) if directory.exists() else [],
        lambda job_id: f"{job_id}.json",
    )


def _redis_backend(raw: redis.Redis, prefix: str) -> Backend:
    opened: list[Any] = []

    def make(**kwargs: Any) -> JobStore:
        store = RedisJobStore(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix, **kwargs)
        opened.append(store)
        return store

    def corrupt(job_id: str) -> None:
        raw.set(f"{prefix}job/{job_id}", b"\x00garbage{not json")

    return Backend(
        "redis",
        make,
        corrupt,
        lambda: sorted(k.decode() for k in raw.scan_iter(match=f"{prefix}*")),
        lambda job_id: f"{prefix}job/{job_id}",
        opened,
    )


@pytest.fixture
def prefix(raw: redis.Redis) -> Iterator[str]:
    prefix = f"nbcluster-test-jobs-{secrets.token_hex(4)}/"
    yield prefix
    leftovers = list(raw.scan_iter(match=f"{prefix}*"))
    if leftovers:
        raw.delete(*leftovers)


@pytest.fixture(params=["file", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "file":
        yield _file_backend(tmp_path)
        return
    made = _redis_backend(request.getfixturevalue("raw"), request.getfixturevalue("prefix"))
    yield made
    for store in made.opened:
        store.close()


def full_job(**changes: Any) -> Job:
    """A job with every field set to something other than its default."""
    spec = JobSpec(
        name="train resnet",
        command=["python", "train.py", "--epochs", "3", "ünïcødé"],
        image="pytorch/pytorch:2.3",
        runtime="pytorchjob",
        queue="gpu",
        env={"SEED": "7", "_X": "a=b"},
        inputs={"data/train.csv": "datasets/train.csv"},
        outputs=["model.pt", "logs/metrics.json"],
        resources=JobResources(gpus=2, cpus=8.5, memory_mb=32768),
        workers=4,
        timeout=7200.0,
        retries=2,
        owner="alice",
    )
    fields: dict[str, Any] = {
        "spec": spec,
        "status": "succeeded",
        "attempts": 2,
        "worker": "host-3",
        "exit_code": 0,
        "error": "first attempt: worker lost",
        "log_tail": "epoch 3: loss 0.12\n",
        "output_keys": {"model.pt": "jobs/abc/model.pt", "logs/metrics.json": "jobs/abc/m.json"},
        "result": "done",
        "created": 1_700_000_000.25,
        "started": 1_700_000_010.5,
        "finished": 1_700_000_999.75,
    }
    fields.update(changes)
    return Job(**fields)


def simple_job(created: float, **changes: Any) -> Job:
    return Job(spec=JobSpec(command=["true"]), created=created, **changes)


# --- the contract ---------------------------------------------------------------------------


def test_save_get_round_trip_keeps_every_field(backend: Backend) -> None:
    store = backend.make()
    job = full_job()
    fast = Job(
        spec=JobSpec(source="print(1)", fast=True, inline_inputs={"a.txt": "x" * 100}),
        status="running",
    )
    store.save(job)
    store.save(fast)
    got = store.get(job.id)
    assert got == job
    assert got is not None and got.spec.resources.gpus == 2
    assert got.output_keys == job.output_keys
    assert store.get(fast.id) == fast
    assert store.get("0" * 32) is None


def test_save_overwrites(backend: Backend) -> None:
    store = backend.make()
    job = simple_job(100.0)
    store.save(job)
    running = job.model_copy(update={"status": "running", "attempts": 1, "started": 101.0})
    store.save(running)
    done = running.model_copy(
        update={"status": "failed", "exit_code": 3, "error": "boom", "finished": 102.0}
    )
    store.save(done)
    assert store.get(job.id) == done
    assert store.load_all() == [done]


def test_load_all_is_ordered_by_created(backend: Backend) -> None:
    store = backend.make()
    assert store.load_all() == []
    jobs = [simple_job(c, id=f"job-{i}") for i, c in enumerate([30.0, 10.0, 20.0, 5.5])]
    tie = [simple_job(20.0, id="job-9"), simple_job(20.0, id="job-0a")]
    for job in jobs + tie:
        store.save(job)
    loaded = store.load_all()
    assert [j.created for j in loaded] == [5.5, 10.0, 20.0, 20.0, 20.0, 30.0]
    # Equal times: by id.
    assert [j.id for j in loaded] == ["job-3", "job-1", "job-0a", "job-2", "job-9", "job-0"]
    # A job saved again with a new created time moves.
    store.save(jobs[0].model_copy(update={"created": 1.0}))
    assert store.load_all()[0].id == "job-0"


def test_load_all_skips_a_corrupt_record_and_names_it(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = backend.make()
    jobs = [simple_job(float(i), id=f"j{i}") for i in range(3)]
    for job in jobs:
        store.save(job)
    backend.corrupt("j1")
    with caplog.at_level(logging.ERROR):
        loaded = store.load_all()
    assert [j.id for j in loaded] == ["j0", "j2"]
    assert backend.where("j1") in caplog.text
    with pytest.raises(JobStoreError, match="j1"):
        store.get("j1")
    # The others are untouched, and saving the job again repairs it.
    assert store.get("j2") == jobs[2]
    store.save(jobs[1])
    assert store.load_all() == jobs


def test_delete_is_idempotent_and_removes_everything(backend: Backend) -> None:
    store = backend.make()
    store.delete("never-saved")
    keep = simple_job(1.0, id="keep")
    store.save(keep)
    job = simple_job(2.0)
    store.save(job)
    store.append_log(job.id, b"some output\n")
    store.delete(job.id)
    assert store.get(job.id) is None
    assert store.read_log(job.id) == b""
    assert store.load_all() == [keep]
    store.delete(job.id)
    store.delete(keep.id)
    assert store.load_all() == []
    assert backend.leftovers() == []


def test_logs_append_and_read_by_offset(backend: Backend) -> None:
    store = backend.make()
    job = simple_job(1.0)
    store.save(job)
    assert store.read_log(job.id) == b""
    assert store.read_log("no-such-job", 5) == b""
    pieces = [b"line 1\n", b"", b"\x00\xff\xfe binary \xc3", b"\xa9 split utf-8\n", b"end"]
    for piece in pieces:
        store.append_log(job.id, piece)
    whole = b"".join(pieces)
    assert store.read_log(job.id) == whole
    for offset in (0, 1, 7, len(whole) - 1):
        assert store.read_log(job.id, offset) == whole[offset:]
    assert store.read_log(job.id, len(whole)) == b""
    assert store.read_log(job.id, len(whole) + 100) == b""
    # Following a running job: read from where the last read ended.
    seen = len(whole)
    store.append_log(job.id, b"more\n")
    assert store.read_log(job.id, seen) == b"more\n"
    with pytest.raises(ValueError, match="offset"):
        store.read_log(job.id, -1)
    # A log may come before the record (output arrives while the job is saved).
    store.append_log("early", b"x")
    assert store.read_log("early") == b"x"


def test_log_cap_truncates_once(backend: Backend) -> None:
    store = backend.make(log_limit=10)
    notice = truncated_notice(10)
    assert b"truncated" in notice
    store.append_log("a", b"12345678")
    store.append_log("a", b"abcdef")  # 2 bytes fit
    assert store.read_log("a") == b"12345678ab" + notice
    store.append_log("a", b"dropped")
    store.append_log("a", b"x" * 100)
    assert store.read_log("a") == b"12345678ab" + notice
    assert store.read_log("a", 10) == notice

    # Exactly at the limit: no notice until more output comes.
    store.append_log("b", b"0123456789")
    assert store.read_log("b") == b"0123456789"
    store.append_log("b", b"!")
    assert store.read_log("b") == b"0123456789" + notice

    # One append far over the limit.
    store.append_log("c", b"y" * 1000)
    assert store.read_log("c") == b"y" * 10 + notice


def test_default_log_cap_is_16_mib(backend: Backend) -> None:
    assert LOG_LIMIT == 16 * 2**20
    assert truncated_notice(LOG_LIMIT) == TRUNCATED_NOTICE
    assert b"16 MiB" in TRUNCATED_NOTICE
    store = backend.make()
    mib = os.urandom(2**20)
    for _ in range(17):
        store.append_log("big", mib)
    got = store.read_log("big")
    assert got == mib * 16 + TRUNCATED_NOTICE
    assert store.read_log("big", LOG_LIMIT) == TRUNCATED_NOTICE


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_are_refused(backend: Backend, bad: str) -> None:
    store = backend.make()
    with pytest.raises(ValueError, match="invalid job id"):
        store.save(simple_job(1.0, id=bad))
    for call in (
        lambda: store.get(bad),
        lambda: store.delete(bad),
        lambda: store.append_log(bad, b"x"),
        lambda: store.read_log(bad),
    ):
        with pytest.raises(ValueError, match="invalid job id"):
            call()
    assert backend.leftovers() == []


def test_good_ids(backend: Backend) -> None:
    store = backend.make()
    for job_id in ["a", "x" * 64, "0f8c2a4e-9b1d-4c3e-8f00-123456789abc", "A_b-C"]:
        job = simple_job(1.0, id=job_id)
        store.save(job)
        assert store.get(job_id) == job


def test_a_second_store_sees_the_same_jobs(backend: Backend) -> None:
    """What a restarted gateway does: open the store again and find everything."""
    first = backend.make()
    jobs = [full_job(id=f"j{i}", created=float(10 - i)) for i in range(3)]
    for job in jobs:
        first.save(job)
    first.append_log("j1", b"before the restart\n")
    first.delete("j2")

    second = backend.make()
    assert second.load_all() == [jobs[1], jobs[0]]
    assert second.get("j0") == jobs[0]
    assert second.get("j2") is None
    assert second.read_log("j1") == b"before the restart\n"

    # The new one carries on; the old one's view (same place) agrees.
    second.append_log("j1", b"after\n")
    second.save(jobs[0].model_copy(update={"status": "cancelled"}))
    assert first.read_log("j1") == b"before the restart\nafter\n"
    got = first.get("j0")
    assert got is not None and got.status == "cancelled"


# --- the file store -------------------------------------------------------------------------


def test_file_layout_and_modes(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "jobs"
    store = FileJobStore(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    job = full_job()
    store.save(job)
    store.save(job.model_copy(update={"status": "failed"}))
    store.append_log(job.id, b"out")
    assert sorted(p.name for p in directory.iterdir()) == [f"{job.id}.json", f"{job.id}.log"]
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert Job.model_validate_json((directory / f"{job.id}.json").read_bytes()).status == "failed"


def test_file_save_failure_keeps_the_old_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FileJobStore(tmp_path)
    job = simple_job(1.0)
    store.save(job)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        store.save(job.model_copy(update={"status": "running"}))
    monkeypatch.undo()
    assert store.get(job.id) == job
    assert [p.name for p in tmp_path.iterdir()] == [f"{job.id}.json"]


def test_file_load_all_skips_strangers_and_names_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = FileJobStore(tmp_path)
    job = simple_job(1.0, id="good")
    store.save(job)
    (tmp_path / "deadbeef.json").write_text("{}")  # valid JSON, not a job
    (tmp_path / "empty.json").write_bytes(b"")
    (tmp_path / "bad name.json").write_text(job.model_dump_json())
    (tmp_path / "other.json").write_text(job.model_dump_json())  # holds job "good"
    (tmp_path / "notes.txt").write_text("not a job")
    (tmp_path / "good.log").write_bytes(b"log")
    stale = tmp_path / ".good.abc.tmp"
    stale.write_text("half a save")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".good.def.tmp"
    fresh.write_text("a save in progress")
    with caplog.at_level(logging.ERROR):
        assert store.load_all() == [job]
    for name in ("deadbeef.json", "empty.json", "bad name.json", "other.json"):
        assert name in caplog.text
    assert "notes.txt" not in caplog.text
    assert not stale.exists()
    assert fresh.exists()


# --- the Redis store ------------------------------------------------------------------------


def test_redis_layout(raw: redis.Redis, prefix: str) -> None:
    store = RedisJobStore(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix)
    try:
        job = simple_job(123.5, id="abc")
        store.save(job)
        store.append_log("abc", b"hello")
        assert raw.type(f"{prefix}job/abc") == b"string"
        assert Job.model_validate_json(raw.get(f"{prefix}job/abc") or b"") == job
        assert raw.zrange(f"{prefix}index", 0, -1, withscores=True) == [(b"abc", 123.5)]
        assert raw.get(f"{prefix}log/abc") == b"hello"
        store.delete("abc")
        assert list(raw.scan_iter(match=f"{prefix}*")) == []
    finally:
        store.close()


def test_redis_index_entry_without_record_is_skipped(
    raw: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = RedisJobStore(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix)
    try:
        job = simple_job(1.0, id="kept")
        store.save(job)
        raw.zadd(f"{prefix}index", {"lost": 0.5, "bad id!": 0.7})
        with caplog.at_level(logging.ERROR):
            assert store.load_all() == [job]
        assert f"{prefix}job/lost" in caplog.text
        assert "bad id!" in caplog.text
    finally:
        store.close()


def test_redis_wrong_type_is_a_clear_error(raw: redis.Redis, prefix: str) -> None:
    store = RedisJobStore(redis.Redis(host="127.0.0.1", port=6379), prefix=prefix)
    try:
        raw.rpush(f"{prefix}log/x", b"a list, not a string")
        with pytest.raises(JobStoreError, match=r"redis://127\.0\.0\.1:6379/0.*WRONGTYPE"):
            store.read_log("x")
    finally:
        store.close()


def test_redis_unreachable_names_the_server() -> None:
    port = free_port()
    store = RedisJobStore.from_url(f"redis://:secret@127.0.0.1:{port}/2")
    try:
        started = time.monotonic()
        with pytest.raises(JobStoreError) as caught:
            store.save(simple_job(1.0))
        message = str(caught.value)
        assert f"redis://127.0.0.1:{port}/2" in message
        assert "after 4 attempts" in message and "saving job" in message
        assert "secret" not in message
        assert isinstance(caught.value, RuntimeError)
        assert time.monotonic() - started < 10
        with pytest.raises(JobStoreError, match="listing jobs"):
            store.load_all()
    finally:
        store.close()


def test_redis_refuses_a_decoding_client() -> None:
    client = redis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisJobStore(client)
    finally:
        client.close()
