"""Hypothesis strategies and small builders shared by the unit tests."""

from __future__ import annotations

import uuid
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from nbcluster.protocol import Message, dumps

__all__ = [
    "buffers",
    "client_channels",
    "fast",
    "headers",
    "json_objects",
    "json_values",
    "kernel_channels",
    "make_message",
]

# orjson handles 64-bit integers only; NaN and infinities are not JSON.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)

json_values: st.SearchStrategy[Any] = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=6,
)

json_objects: st.SearchStrategy[dict[str, Any]] = st.dictionaries(
    st.text(max_size=8), json_values, max_size=4
)

#: For the heavier property tests: enough examples to matter, few enough to stay fast.
fast = settings(max_examples=40, deadline=None)

_ids = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=32)

headers: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "msg_id": _ids,
        "msg_type": st.sampled_from(
            ["execute_request", "kernel_info_request", "comm_msg", "input_reply", "status"]
        ),
        "session": _ids,
        "username": st.text(max_size=10),
        "version": st.just("5.4"),
    }
)

client_channels = st.sampled_from(["shell", "control", "stdin"])
kernel_channels = st.sampled_from(["shell", "control", "stdin", "iopub"])

buffers: st.SearchStrategy[list[bytes]] = st.lists(st.binary(max_size=64), max_size=4)


def make_message(
    channel: str = "shell",
    msg_type: str = "execute_request",
    content: dict[str, Any] | None = None,
    *,
    parent: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
    buffers: list[bytes] | None = None,
) -> Message:
    """A message built from dicts through the same parser the decoders use."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "session": "s",
        "username": "u",
        "date": "2025-01-02T03:04:05.000006Z",
        "version": "5.4",
    }
    return Message.from_parts(
        channel,
        dumps(header),
        dumps(parent or {}),
        dumps(metadata or {}),
        dumps(content if content is not None else {"code": "1 + 1"}),
        buffers,
    )
