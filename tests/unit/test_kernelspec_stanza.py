"""The gateway kernelspec's ``nbcluster`` stanza beyond pools and images: default resources,
the env allow-list and a per-kernelspec launch timeout (issue 16, part 3), and how
``validate_env`` applies the allow-list."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nbcluster.gateway._kernelspecs import KernelSpecError, KernelSpecRegistry
from nbcluster.gateway._manager import validate_env

ARGV = ["python", "-m", "nbcluster.kernel", "-f", "{connection_file}"]


def _load(tmp_path: Path, metadata: dict[str, Any]) -> Any:
    path = tmp_path / "kernel.json"
    spec = {"argv": ARGV, "display_name": "x", "language": "python", "metadata": metadata}
    path.write_text(json.dumps(spec))
    return KernelSpecRegistry.load_file(path)


def test_a_kernelspec_without_a_stanza_has_no_defaults(tmp_path: Path) -> None:
    spec = _load(tmp_path, {})
    assert (spec.default_resources, spec.allowed_env, spec.launch_timeout) == ({}, (), None)


def test_the_stanza_is_read(tmp_path: Path) -> None:
    spec = _load(
        tmp_path,
        {
            "nbcluster": {
                "resources": {"gpus": 2, "cpus": 1.5, "memory_mb": 8192, "vram_gb": 20},
                "allowed_env": ["HF_HOME", "WANDB_*"],
                "launch_timeout": 90,
            }
        },
    )
    assert spec.default_resources == {
        "KERNEL_GPUS": "2",
        "KERNEL_CPUS": "1.5",
        "KERNEL_MEMORY_MB": "8192",
        "KERNEL_VRAM_GB": "20",
    }
    assert spec.allowed_env == ("HF_HOME", "WANDB_*")
    assert spec.launch_timeout == 90.0
    provisioner = {"kernel_provisioner": {"config": {"launch_timeout": 12.5}}}
    assert _load(tmp_path, provisioner).launch_timeout == 12.5


@pytest.mark.parametrize(
    ("stanza", "words"),
    [
        ({"resources": [1]}, "nbcluster resources must be an object"),
        ({"resources": {"tpus": 1}}, "unknown resource 'tpus' (one of gpus, cpus, memory_mb"),
        ({"resources": {"gpus": 1.5}}, "resources gpus: must be a whole number >= 0, not 1.5"),
        ({"resources": {"cpus": -1}}, "resources cpus: must be a number >= 0, not -1"),
        ({"resources": {"gpus": True}}, "resources gpus: must be a whole number"),
        ({"allowed_env": "HOME"}, "allowed_env must be a list of variable names"),
        ({"allowed_env": ["A B"]}, "'A B' is not a variable name"),
        ({"allowed_env": ["*"]}, "'*' is not a variable name"),
        ({"allowed_env": ["NBCLUSTER_*"]}, "would let clients set the gateway's own"),
        ({"allowed_env": ["JPY_SESSION_NAME"]}, "would let clients set the gateway's own"),
        ({"launch_timeout": 0}, "nbcluster launch_timeout: must be seconds > 0, not 0"),
        ({"launch_timeout": "60"}, "must be seconds > 0, not '60'"),
    ],
)
def test_a_bad_stanza_is_refused_naming_the_field(
    tmp_path: Path, stanza: dict[str, Any], words: str
) -> None:
    with pytest.raises(KernelSpecError, match=re.escape(words)):
        _load(tmp_path, {"nbcluster": stanza})


def test_the_allow_list_lets_named_variables_through_and_drops_the_rest() -> None:
    env = {"KERNEL_GPUS": "1", "HF_HOME": "/data/hf", "WANDB_MODE": "offline", "HOME": "/x"}
    assert validate_env(env) == {"KERNEL_GPUS": "1"}
    assert validate_env(env, allowed=("HF_HOME", "WANDB_*")) == {
        "KERNEL_GPUS": "1",
        "HF_HOME": "/data/hf",
        "WANDB_MODE": "offline",
    }
    # An allowed variable is held to the same limits as a KERNEL_* one.
    with pytest.raises(Exception, match="HF_HOME: 2000 bytes is over the limit"):
        validate_env({"HF_HOME": "x" * 2000}, max_value_bytes=1024, allowed=("HF_HOME",))
