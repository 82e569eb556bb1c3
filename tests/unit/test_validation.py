"""Request validation, kernelspecs, placement and the state stores."""

from __future__ import annotations

import json
import logging
import re
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbcluster.gateway import (
    DEFAULT_KERNEL_NAME,
    FileStateStore,
    KernelRecord,
    KernelRequestError,
    KernelSpecError,
    KernelSpecRegistry,
    MemoryStateStore,
    ReplicaRecord,
    validate_env,
)
from nbcluster.hostproto import ConnectionInfo

# -- validate_env -----------------------------------------------------------------------------


def test_only_kernel_variables_are_kept() -> None:
    env = {
        "KERNEL_GPUS": "2",
        "KERNEL_WORKING_DIR": "/home/u",
        "KERNEL_USERNAME": "u",
        "PATH": "/evil",
        "LD_PRELOAD": "x.so",
        "kernel_lower": "x",
    }
    assert validate_env(env) == {
        "KERNEL_GPUS": "2",
        "KERNEL_WORKING_DIR": "/home/u",
        "KERNEL_USERNAME": "u",
    }
    assert validate_env({}) == {}


@pytest.mark.parametrize("name", ["1ABC", "KERNEL-GPUS", "KERNEL GPUS", "", "KERNEL_É", "A=B"])
def test_bad_names(name: str) -> None:
    with pytest.raises(
        KernelRequestError, match="is not a valid environment variable name"
    ) as info:
        validate_env({name: "1"})
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("value", [1, 1.5, None, True, ["1"], {"a": "b"}])
def test_non_string_values(value: Any) -> None:
    with pytest.raises(KernelRequestError, match=r"env\.KERNEL_X: must be a string, got") as info:
        validate_env({"KERNEL_X": value})
    assert type(value).__name__ in str(info.value)


def test_non_string_value_of_a_dropped_variable_is_still_rejected() -> None:
    with pytest.raises(KernelRequestError, match=r"env\.PATH: must be a string"):
        validate_env({"PATH": 3})


def test_nul_character() -> None:
    with pytest.raises(KernelRequestError, match=r"env\.KERNEL_X: contains a NUL"):
        validate_env({"KERNEL_X": "a\x00b"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("abc", "env.KERNEL_GPUS: 'abc' is not an integer"),
        ("1.5", "env.KERNEL_GPUS: '1.5' is not an integer"),
        ("", "env.KERNEL_GPUS: '' is not an integer"),
        ("lots", "env.KERNEL_GPUS: 'lots' is not an integer"),
        ("-1", "env.KERNEL_GPUS: must be a finite, non-negative number, got '-1'"),
    ],
)
def test_bad_gpu_counts(value: str, expected: str) -> None:
    with pytest.raises(KernelRequestError) as info:
        validate_env({"KERNEL_GPUS": value})
    assert str(info.value) == expected


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("KERNEL_CPUS", "half", "env.KERNEL_CPUS: 'half' is not a number"),
        ("KERNEL_CPUS", "-0.5", "env.KERNEL_CPUS: must be a finite, non-negative number"),
        ("KERNEL_CPUS", "nan", "env.KERNEL_CPUS: must be a finite, non-negative number"),
        ("KERNEL_CPUS", "inf", "env.KERNEL_CPUS: must be a finite, non-negative number"),
        ("KERNEL_MEMORY_MB", "1GB", "env.KERNEL_MEMORY_MB: '1GB' is not a number"),
        ("KERNEL_VRAM_GB", "-8", "env.KERNEL_VRAM_GB: must be a finite, non-negative number"),
    ],
)
def test_bad_resource_numbers(name: str, value: str, expected: str) -> None:
    with pytest.raises(KernelRequestError, match=re.escape(expected)):
        validate_env({name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KERNEL_GPUS", "0"),
        ("KERNEL_GPUS", "8"),
        ("KERNEL_CPUS", "0.5"),
        ("KERNEL_CPUS", "4"),
        ("KERNEL_MEMORY_MB", "2048.5"),
        ("KERNEL_VRAM_GB", "0"),
    ],
)
def test_good_resource_numbers(name: str, value: str) -> None:
    assert validate_env({name: value}) == {name: value}


@pytest.mark.parametrize(
    "name",
    ["alice; touch /tmp/pwned", "$(id)", "`id`", "a b", "bob|cat", "-rf", "x\ny", "", "é" * 3],
)
def test_a_user_name_with_shell_metacharacters_is_refused(name: str) -> None:
    with pytest.raises(KernelRequestError, match=r"env\.KERNEL_USERNAME: .* is not a user name"):
        validate_env({"KERNEL_USERNAME": name})


@pytest.mark.parametrize("name", ["alice", "a.b-c_d", "alice@example.org", "u+tag", "x" * 256])
def test_ordinary_user_names_pass(name: str) -> None:
    assert validate_env({"KERNEL_USERNAME": name}) == {"KERNEL_USERNAME": name}


@given(st.dictionaries(st.text(max_size=12), st.text(max_size=8), max_size=5))
def test_validate_env_accepts_or_names_the_problem(env: dict[str, str]) -> None:
    try:
        accepted = validate_env(env)
    except KernelRequestError as exc:
        assert str(exc).startswith("env")
        return
    assert set(accepted) <= set(env)
    assert all(name.startswith("KERNEL_") for name in accepted)
    assert all(accepted[name] == env[name] for name in accepted)


# -- kernelspecs ------------------------------------------------------------------------------

GOOD_SPEC = {
    "argv": ["python", "-m", "mykernel", "-f", "{connection_file}"],
    "display_name": "My Kernel",
    "language": "python",
    "interrupt_mode": "message",
    "env": {"A": "1"},
    "metadata": {"x": 1},
}


def _write_spec(root: Path, name: str, content: str | dict[str, Any]) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    path = directory / "kernel.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_builtin_python3_model_has_the_shape_jupyter_expects() -> None:
    registry = KernelSpecRegistry()
    assert registry.names == ["python3"]
    assert DEFAULT_KERNEL_NAME == "python3"
    models = registry.models()
    assert set(models) == {"default", "kernelspecs"}
    assert models["default"] == "python3"
    assert set(models["kernelspecs"]) == {"python3"}
    model = models["kernelspecs"]["python3"]
    assert set(model) == {"name", "spec", "resources"}
    assert model["name"] == "python3"
    spec = model["spec"]
    assert {"argv", "display_name", "language", "interrupt_mode", "env", "metadata"} <= set(spec)
    assert "{connection_file}" in spec["argv"]
    assert spec["argv"][:3] == ["python", "-m", "nbcluster.kernel"]
    assert spec["language"] == "python"
    assert spec["interrupt_mode"] in ("signal", "message")
    assert isinstance(spec["display_name"], str) and spec["display_name"]
    resources = model["resources"]
    assert resources["logo-64x64"] == "/kernelspecs/python3/logo-64x64.png"
    assert resources["logo-32x32"] == "/kernelspecs/python3/logo-32x32.png"
    assert registry.model("python3", "/base")["resources"]["logo-64x64"] == (
        "/base/kernelspecs/python3/logo-64x64.png"
    )
    json.dumps(models)  # serialisable as the REST answer


def test_resource_paths() -> None:
    registry = KernelSpecRegistry()
    logo = registry.resource_path("python3", "logo-64x64.png")
    assert logo is not None and logo.read_bytes().startswith(b"\x89PNG")
    assert registry.resource_path("python3", "kernel.json") is None  # not a resource name
    assert registry.resource_path("python3", "../../etc/passwd") is None
    assert registry.resource_path("nope", "logo-64x64.png") is None
    assert registry.resource_path("python3", "kernel.js") is None  # allowed name, no file


def test_directory_with_good_and_bad_specs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_spec(tmp_path, "extra", GOOD_SPEC)
    _write_spec(tmp_path, "broken", "{ this is not json")
    _write_spec(tmp_path, "noconn", {**GOOD_SPEC, "argv": ["python", "-m", "mykernel"]})
    (tmp_path / "empty").mkdir()
    (tmp_path / "stray-file.json").write_text("{}")
    (tmp_path / "extra" / "logo-64x64.png").write_bytes(b"\x89PNG fake")
    with caplog.at_level(logging.ERROR):
        registry = KernelSpecRegistry((tmp_path, tmp_path / "does-not-exist"))
    assert registry.names == ["extra", "python3"]
    extra = registry.get("extra")
    assert extra is not None
    assert extra.display_name == "My Kernel"
    assert extra.interrupt_mode == "message"
    assert extra.env == {"A": "1"}
    assert registry.get("broken") is None
    assert registry.get("noconn") is None
    model = registry.models()
    assert set(model["kernelspecs"]) == {"extra", "python3"}
    assert model["kernelspecs"]["extra"]["resources"] == {
        "logo-64x64": "/kernelspecs/extra/logo-64x64.png"
    }
    log = caplog.text
    assert "broken" in log and "not valid JSON" in log
    assert "noconn" in log and "connection_file" in log
    assert "does-not-exist" in log


def test_operator_spec_may_replace_python3(tmp_path: Path) -> None:
    _write_spec(tmp_path, "python3", {**GOOD_SPEC, "display_name": "Custom"})
    spec = KernelSpecRegistry((tmp_path,)).get("python3")
    assert spec is not None and spec.display_name == "Custom"


def test_extra_fields_are_kept(tmp_path: Path) -> None:
    path = _write_spec(tmp_path, "x", {**GOOD_SPEC, "codemirror_mode": "python"})
    spec = KernelSpecRegistry.load_file(path)
    assert spec.model_dump()["codemirror_mode"] == "python"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{ nope", "not valid JSON"),
        ("[]", "kernel.json: Input should be a valid dictionary"),
        ({**GOOD_SPEC, "argv": []}, "argv: List should have at least 1 item"),
        (
            {**GOOD_SPEC, "argv": ["python"]},
            "argv: Value error, argv must contain '{connection_file}'",
        ),
        (
            {**GOOD_SPEC, "argv": "python -f {connection_file}"},
            "argv: Input should be a valid list",
        ),
        (
            {k: v for k, v in GOOD_SPEC.items() if k != "display_name"},
            "display_name: Field required",
        ),
        ({**GOOD_SPEC, "language": ""}, "language: String should have at least 1 character"),
        (
            {**GOOD_SPEC, "interrupt_mode": "never"},
            "interrupt_mode: Input should be 'signal' or 'message'",
        ),
        ({**GOOD_SPEC, "env": {"A": 1}}, "env.A: Input should be a valid string"),
    ],
)
def test_load_file_errors_name_file_and_field(
    tmp_path: Path, content: str | dict[str, Any], expected: str
) -> None:
    path = _write_spec(tmp_path, "spec", content)
    with pytest.raises(KernelSpecError) as info:
        KernelSpecRegistry.load_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_load_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "kernel.json"
    with pytest.raises(KernelSpecError, match="cannot read: No such file or directory") as info:
        KernelSpecRegistry.load_file(path)
    assert str(path) in str(info.value)


# -- state stores -----------------------------------------------------------------------------


def _record(kernel_id: str = "k1") -> KernelRecord:
    return KernelRecord(
        id=kernel_id,
        name="python3",
        key="f" * 64,
        env={"KERNEL_GPUS": "1"},
        replicas=[
            ReplicaRecord(
                replica_id="r1",
                host="h1",
                state="running",
                pid=123,
                connection=ConnectionInfo(
                    ip="127.0.0.1",
                    shell_port=1,
                    iopub_port=2,
                    stdin_port=3,
                    control_port=4,
                    hb_port=5,
                ),
            )
        ],
    )


def test_file_store_round_trip(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path)
    record = _record()
    store.save(record)
    store.save(_record("k2"))
    loaded = store.load_all()
    assert [r.id for r in loaded] == ["k1", "k2"]
    assert loaded[0] == record
    record.replicas[0].state = "dead"
    store.save(record)
    assert store.load_all()[0].replicas[0].state == "dead"
    store.delete("k1")
    store.delete("k1")  # deleting twice is fine
    assert [r.id for r in store.load_all()] == ["k2"]
    # a new store over the same directory sees the same records (a restarted gateway)
    assert [r.id for r in FileStateStore(tmp_path).load_all()] == ["k2"]


def test_file_store_permissions(tmp_path: Path) -> None:
    store = FileStateStore(tmp_path / "state")
    store.save(_record())
    path = tmp_path / "state" / "kernels" / "k1.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert not list(path.parent.glob("*.tmp"))
    assert json.loads(path.read_text())["key"] == "f" * 64


def test_file_store_skips_corrupt_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = FileStateStore(tmp_path)
    store.save(_record("good"))
    kernels = tmp_path / "kernels"
    (kernels / "garbage.json").write_text("{ not json")
    (kernels / "wrong.json").write_text(json.dumps({"id": "x"}))
    (kernels / "left.tmp").write_text("{}")
    with caplog.at_level(logging.ERROR):
        loaded = store.load_all()
    assert [r.id for r in loaded] == ["good"]
    assert "garbage.json" in caplog.text
    assert "wrong.json" in caplog.text


def test_memory_store_round_trip_with_copies() -> None:
    store = MemoryStateStore()
    record = _record()
    store.save(record)
    record.dead_reason = "changed after saving"
    [loaded] = store.load_all()
    assert loaded.dead_reason == ""
    loaded.replicas.clear()
    assert len(store.load_all()[0].replicas) == 1
    store.delete("k1")
    store.delete("k1")
    assert store.load_all() == []


@pytest.mark.parametrize(
    ("metadata", "image"),
    [
        ({}, None),
        (
            {"kernel_provisioner": {"config": {"image_name": "nbcluster:latest"}}},
            "nbcluster:latest",
        ),
        (
            {"nbcluster": {"image": "registry.example:5000/team/k@sha256:ab12"}},
            "registry.example:5000/team/k@sha256:ab12",
        ),
        (
            {
                "kernel_provisioner": {"config": {"image_name": "first:1"}},
                "nbcluster": {"image": "second:2"},
            },
            "first:1",
        ),
    ],
)
def test_a_kernelspec_names_its_image(
    tmp_path: Path, metadata: dict[str, Any], image: str | None
) -> None:
    path = _write_spec(tmp_path, "k", {**GOOD_SPEC, "metadata": metadata})
    assert KernelSpecRegistry.load_file(path).image == image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("-v /:/host", "is not a container image reference"),
        ("has space:1", "is not a container image reference"),
        (5, "image_name must be a string, not int"),
    ],
)
def test_a_bad_image_skips_the_kernelspec_with_the_reason(
    tmp_path: Path, image: object, expected: str
) -> None:
    metadata = {"kernel_provisioner": {"config": {"image_name": image}}}
    path = _write_spec(tmp_path, "k", {**GOOD_SPEC, "metadata": metadata})
    with pytest.raises(KernelSpecError, match=re.escape(expected)):
        KernelSpecRegistry.load_file(path)
