"""Every error the gateway raises for a caller to see, in one tree.

Each class carries the HTTP status and the short ``reason`` the REST API answers with when it
escapes a request handler (``_http.error_status`` reads them; nothing matches on message text).
The message (``str(exc)``) says what went wrong for a person.

.. code-block:: text

    NbclusterError (500)
    ├── ApiError                 status and reason given by the handler that raises it
    ├── NoSuchKernel             404  LookupError
    ├── NoSuchJob                404  LookupError
    ├── KernelRequestError       400  ValueError: bad kernelspec name or KERNEL_* value
    ├── RequestTooLarge          413  ValueError: a request body over its limit
    ├── RequestTimedOut          408  a request body that stopped arriving
    ├── KernelSpecError          500  ValueError: an operator's kernelspec is invalid
    ├── KernelStartError         503  RuntimeError
    │   └── KernelRejected       400 if permanent (no host could ever take it), else 503
    ├── KernelUnavailable        409  RuntimeError: the kernel cannot take the request now
    ├── MigrationError           409  RuntimeError
    ├── CheckpointError          409  RuntimeError
    ├── JobError                 409  RuntimeError
    ├── HostProviderError        503  RuntimeError: hosts could not be started or stopped
    └── HostRequestError         502  RuntimeError: a host did not carry out a request
        ├── HostUnreachable      502  not connected, or its websocket closed
        ├── HostRefused          502  it answered with an error (the message is its answer)
        ├── HostTimedOut         504  it did not answer in time
        └── HostMessageTooLarge  413  the request is over the host's message cap: never sent

The builtin bases (``LookupError``, ``ValueError``, ``RuntimeError``) are those the classes had
before they were gathered here, so ``except ValueError`` and the like still catch them.
"""

from __future__ import annotations

__all__ = [
    "ApiError",
    "CheckpointError",
    "HostMessageTooLarge",
    "HostProviderError",
    "HostRefused",
    "HostRequestError",
    "HostTimedOut",
    "HostUnreachable",
    "JobError",
    "KernelRejected",
    "KernelRequestError",
    "KernelSpecError",
    "KernelStartError",
    "KernelUnavailable",
    "MigrationError",
    "NbclusterError",
    "NoSuchJob",
    "NoSuchKernel",
    "RequestTimedOut",
    "RequestTooLarge",
]


class NbclusterError(Exception):
    """The root of the gateway's errors: ``status`` and ``reason`` are what the REST API
    answers with (``{"message": str(exc), "reason": reason}``)."""

    status: int = 500
    reason: str = "internal error"


class ApiError(NbclusterError):
    """Raised by a request handler with the status and reason to answer with."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        # Instance attributes shadow the class's: an ApiError says its own status.
        self.status = status
        self.message = message
        self.reason = reason or message


class NoSuchKernel(NbclusterError, LookupError):
    """No kernel has that id."""

    status = 404
    reason = "kernel not found"


class NoSuchJob(NbclusterError, LookupError):
    """No job has that id."""

    status = 404
    reason = "job not found"


class KernelRequestError(NbclusterError, ValueError):
    """The request names an unknown kernelspec or carries bad values."""

    status = 400
    reason = "bad request"


class RequestTooLarge(NbclusterError, ValueError):
    """A request body is over its size limit (the message names the limit and the setting).
    Raised while the body is read, before it is all buffered."""

    status = 413
    reason = "request too large"


class RequestTimedOut(NbclusterError):
    """A request body stopped arriving for longer than the body timeout."""

    status = 408
    reason = "request timed out"


class KernelSpecError(NbclusterError, ValueError):
    """A kernelspec is invalid; the text names the file and the field."""

    reason = "invalid kernelspec"


class KernelStartError(NbclusterError, RuntimeError):
    """The kernel could not be started (no host, a replica failed ...); the text says why."""

    status = 503
    reason = "kernel could not be started"


class KernelRejected(KernelStartError):
    """The scheduler refused the kernel. ``permanent``: no host could ever take it (400);
    otherwise the cluster is full now (503)."""

    def __init__(self, reason: str, permanent: bool) -> None:
        super().__init__(reason)
        self.permanent = permanent
        self.status = 400 if permanent else 503
        self.reason = (
            "kernel request cannot be satisfied" if permanent else "no capacity for the kernel"
        )


class KernelUnavailable(NbclusterError, RuntimeError):
    """The kernel cannot take the request now; the text says why."""

    status = 409
    reason = "kernel unavailable"


class MigrationError(NbclusterError, RuntimeError):
    """A requested migration was refused or failed; the text says why."""

    status = 409
    reason = "migration refused or failed"


class CheckpointError(NbclusterError, RuntimeError):
    """A requested checkpoint could not be written; the text says why."""

    status = 409
    reason = "checkpoint failed"


class JobError(NbclusterError, RuntimeError):
    """A job request cannot be carried out now; the text says why."""

    status = 409
    reason = "job request failed"


class HostProviderError(NbclusterError, RuntimeError):
    """A provider could not start or stop hosts (the message says why)."""

    status = 503
    reason = "host provider failed"


class HostRequestError(NbclusterError, RuntimeError):
    """A host could not carry out a request. Callers that care why catch a subclass."""

    status = 502
    reason = "host request failed"


class HostUnreachable(HostRequestError):
    """The host is not connected, or its websocket closed before it answered: it went away,
    and the request may be sent again once it (or another host) is there."""

    reason = "host unreachable"


class HostRefused(HostRequestError):
    """The host answered the request with an error (its text is the message)."""

    reason = "host refused the request"


class HostTimedOut(HostRequestError):
    """The host did not answer within the request's timeout."""

    status = 504
    reason = "host timed out"


class HostMessageTooLarge(HostRequestError):
    """The request would be a frame over the host's websocket message cap
    (``hostproto.MAX_FRAME_BYTES``): it is refused here and never sent, since a host closes
    its connection on a frame over its cap."""

    status = 413
    reason = "request too large for a host"
