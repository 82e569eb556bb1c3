"""The gateway's error tree and the one exception → HTTP status table (``gateway._http``)."""

from __future__ import annotations

import inspect

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from nbcluster import gateway
from nbcluster.gateway import _errors
from nbcluster.gateway._errors import (
    ApiError,
    CheckpointError,
    HostProviderError,
    HostRefused,
    HostRequestError,
    HostTimedOut,
    HostUnreachable,
    JobError,
    KernelRejected,
    KernelRequestError,
    KernelSpecError,
    KernelStartError,
    KernelUnavailable,
    MigrationError,
    NbclusterError,
    NoSuchJob,
    NoSuchKernel,
)
from nbcluster.gateway._http import (
    FOREIGN_ERRORS,
    error_status,
    http_error,
    parse_body,
)
from nbcluster.store import ObjectCorruptedError, ObjectNotFoundError, StoreError

#: What the REST API answered for each error before the tree existed (the handlers of
#: ``_app.create_app``): the tree must answer the same.
EXPECTED: list[tuple[Exception, int, str]] = [
    (NoSuchKernel("no kernel with id k"), 404, "kernel not found"),
    (NoSuchJob("no job with id j"), 404, "job not found"),
    (KernelRequestError("env: bad"), 400, "bad request"),
    (KernelStartError("no host"), 503, "kernel could not be started"),
    (KernelRejected("too big", permanent=True), 400, "kernel request cannot be satisfied"),
    (KernelRejected("full", permanent=False), 503, "no capacity for the kernel"),
    (MigrationError("refused"), 409, "migration refused or failed"),
    (CheckpointError("failed"), 409, "checkpoint failed"),
    (JobError("worker gone"), 409, "job request failed"),
    (KernelUnavailable("dead"), 409, "kernel unavailable"),
    (ApiError(418, "teapot", "short and stout"), 418, "short and stout"),
    (ApiError(404, "no such thing"), 404, "no such thing"),
    (StoreError("down"), 503, "store error"),
    (ObjectNotFoundError("gone"), 410, "gone"),
    (ObjectCorruptedError("k", "bad checksum"), 503, "store error"),
    (HTTPException(405, "Method Not Allowed"), 405, "Method Not Allowed"),
    (RequestValidationError([]), 400, "bad request"),
]


@pytest.mark.parametrize(("exc", "status", "reason"), EXPECTED, ids=lambda v: repr(v)[:40])
def test_each_error_answers_with_its_status_and_reason(
    exc: Exception, status: int, reason: str
) -> None:
    assert error_status(exc) == (status, reason)


def test_host_errors_say_why_by_class_not_by_text() -> None:
    assert error_status(HostUnreachable("host h is not connected")) == (502, "host unreachable")
    assert error_status(HostRefused("no such runtime")) == (502, "host refused the request")
    assert error_status(HostTimedOut("host h did not answer within 5 s")) == (
        504,
        "host timed out",
    )
    for cls in (HostUnreachable, HostRefused, HostTimedOut):
        assert issubclass(cls, HostRequestError)
        # The message says nothing the class does not: callers catch the class.
        assert error_status(cls("anything at all"))[0] in (502, 504)  # type: ignore[index]


def test_an_error_from_outside_the_tables_has_no_status() -> None:
    assert error_status(KeyError("x")) is None
    assert http_error(KeyError("x")).status == 500


def test_every_class_of_the_tree_has_a_status_and_a_reason() -> None:
    classes = [
        c
        for _, c in inspect.getmembers(_errors, inspect.isclass)
        if issubclass(c, NbclusterError) and c.__module__ == _errors.__name__
    ]
    assert set(_errors.__all__) == {c.__name__ for c in classes}
    for cls in classes:
        assert 400 <= cls.status <= 599, cls
        assert cls.reason, cls


def test_the_tree_keeps_the_builtin_bases_callers_catch() -> None:
    assert issubclass(NoSuchKernel, LookupError) and issubclass(NoSuchJob, LookupError)
    assert issubclass(KernelRequestError, ValueError) and issubclass(KernelSpecError, ValueError)
    for cls in (KernelStartError, KernelUnavailable, MigrationError, CheckpointError, JobError):
        assert issubclass(cls, RuntimeError)
    assert issubclass(HostRequestError, RuntimeError)
    assert issubclass(HostProviderError, RuntimeError)
    assert issubclass(KernelRejected, KernelStartError)


def test_the_gateway_package_exports_the_errors_that_are_raised() -> None:
    # While a module still defines its own class, the package exports that one (the one
    # raised), and the table maps it like its tree counterpart.
    for name in ("NoSuchKernel", "KernelRequestError", "KernelStartError", "KernelUnavailable"):
        exported = getattr(gateway, name)
        status = error_status(exported("x"))
        assert status == error_status(getattr(_errors, name)("x")), name
    for name in ("HostRequestError", "HostProviderError", "KernelSpecError", "NoSuchJob"):
        assert getattr(gateway, name) is getattr(_errors, name)


def test_http_error_keeps_the_tables_status_with_a_clearer_message() -> None:
    error = http_error(ObjectNotFoundError("k"), "output 'x' is no longer in the store")
    assert (error.status, error.reason, str(error)) == (
        410,
        "gone",
        "output 'x' is no longer in the store",
    )


def test_the_foreign_table_lists_specific_classes_before_their_bases() -> None:
    classes = [cls for cls, _, _ in FOREIGN_ERRORS]
    for i, cls in enumerate(classes):
        for later in classes[i + 1 :]:
            assert not issubclass(later, cls), f"{later} is shadowed by {cls}"


class _Body(BaseModel):
    name: str
    count: int = 0


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{nope", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b"{}", "invalid request body: name: Field required"),
        (b'{"name": 1, "count": "x"}', "invalid request body: name: "),
    ],
)
def test_parse_body_answers_400_saying_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(ApiError) as caught:
        parse_body(raw, _Body)
    assert caught.value.status == 400 and caught.value.reason == "bad request"
    assert str(caught.value).startswith(message), str(caught.value)


def test_parse_body_lists_every_wrong_field() -> None:
    with pytest.raises(ApiError, match=r"invalid job: name: .*; count: "):
        parse_body(b'{"name": 1, "count": "x"}', _Body, subject="job")


def test_parse_body_empty_is_an_object_unless_told_otherwise() -> None:
    with pytest.raises(ApiError, match="invalid request body: name: Field required"):
        parse_body(b"  ", _Body)
    with pytest.raises(ApiError, match=r"request body is not valid JSON"):
        parse_body(b"", _Body, empty_is_object=False)
    with pytest.raises(ApiError, match=r"must be a JSON object \(a job spec\)"):
        parse_body(b"3", _Body, expect="a job spec")
    assert parse_body(b'{"name": "n"}', _Body) == _Body(name="n")
