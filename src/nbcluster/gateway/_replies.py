"""What a client gets from the gateway instead of a kernel's answer: error replies that say
why, and the kernel's lifecycle status messages. Pure message builders, no state."""

from __future__ import annotations

from typing import Any

from ..protocol import Message, new_message

__all__ = ["error_replies", "status_message"]


def status_message(state: str, parent: bytes | None = None) -> Message:
    """An IOPub ``status`` (``parent``: the raw header of the request it closes)."""
    return new_message("iopub", "status", {"execution_state": state}, parent=parent)


def error_replies(
    channel: str,
    msg_type: str,
    request_header: bytes,
    ename: str,
    evalue: str,
    execution_count: int | None = None,
) -> list[Message]:
    """What a client gets instead of the kernel's answer to a request (given by its channel,
    type and raw header). An execute request also gets an IOPub ``error`` so that the message
    shows in the cell, and its reply the cell's ``execution_count`` when one is known (a cell
    cut off while it ran had one). The closing ``idle`` status (parented to the request) completes the
    request in clients that wait for it, as JupyterLab and nbclient do; a kernel-wide ``dead``
    status, if any, follows it.
    """
    reply_type = msg_type.removesuffix("_request") + "_reply"
    content: dict[str, Any] = {
        "status": "error",
        "ename": ename,
        "evalue": evalue,
        "traceback": [f"{ename}: {evalue}"],
    }
    messages = []
    if msg_type == "execute_request":
        content["execution_count"] = execution_count
        messages.append(
            new_message(
                "iopub",
                "error",
                {"ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]},
                parent=request_header,
            )
        )
    messages.append(new_message(channel, reply_type, content, parent=request_header))
    messages.append(
        new_message("iopub", "status", {"execution_state": "idle"}, parent=request_header)
    )
    return messages
