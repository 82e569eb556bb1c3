"""What every HTTP handler of the gateway shares: reading a JSON request body into a model
(with a 400 that says what is wrong) and the one table that turns an exception into a status,
a reason and a JSON error (``{"message", "reason", "timestamp"}``, as jupyter_server writes
them, which is what its gateway client reads).

The errors of the gateway's own tree (``_errors.NbclusterError``) carry their status; errors
from elsewhere (the object store, pydantic, Starlette) get theirs from :data:`FOREIGN_ERRORS`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..store import ObjectNotFoundError, StoreError
from ._errors import ApiError, NbclusterError

__all__ = [
    "ERROR_RESPONSES",
    "FOREIGN_ERRORS",
    "ErrorBody",
    "describe_validation",
    "error_response",
    "error_status",
    "http_error",
    "json_body",
    "parse_body",
]

BodyModel = TypeVar("BodyModel", bound=BaseModel)

#: Status and reason of errors that are not the gateway's own, most specific first.
FOREIGN_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (RequestValidationError, 400, "bad request"),
    (ObjectNotFoundError, 410, "gone"),
    (StoreError, 503, "store error"),
)


class ErrorBody(BaseModel):
    """What every error answer of the REST API holds (``error_response``)."""

    message: str = Field(description="What is wrong, for a person.")
    reason: str = Field(description="A short reason: `not found`, `bad request` ...")
    timestamp: str | None = Field(None, description="When (ISO 8601).")


#: The error answers every route may give, for the OpenAPI document (``APIRouter(responses=
#: ...)``): whatever the status, the body is an :class:`ErrorBody`.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "Refused: the message says what is wrong."},
    "5XX": {
        "model": ErrorBody,
        "description": "Something the gateway depends on (hosts, the object store, the "
        "identity source) cannot serve the request now.",
    },
}


def error_status(exc: BaseException) -> tuple[int, str] | None:
    """The HTTP status and reason for ``exc``; None when nothing says (a bug: 500)."""
    if isinstance(exc, NbclusterError):
        return exc.status, exc.reason
    if isinstance(exc, StarletteHTTPException):
        return exc.status_code, str(exc.detail)
    for cls, status, reason in FOREIGN_ERRORS:
        if isinstance(exc, cls):
            return status, reason
    return None


def error_response(status: int, message: str, reason: str) -> JSONResponse:
    return JSONResponse(
        {"message": message, "reason": reason, "timestamp": datetime.now(UTC).isoformat()},
        status_code=status,
    )


def http_error(exc: BaseException, message: str | None = None) -> ApiError:
    """An :class:`ApiError` with the status and reason the table gives ``exc`` (500 if none)
    and ``message`` (else ``str(exc)``): for a handler that says more than the error does."""
    status, reason = error_status(exc) or (500, "internal error")
    return ApiError(status, message if message is not None else str(exc), reason)


def describe_validation(exc: ValidationError | RequestValidationError, subject: str) -> str:
    """Up to five problems, each ``where: what``: ``invalid <subject>: env: ...; name: ...``."""
    problems = []
    for err in list(exc.errors())[:5]:
        if err.get("type") == "json_invalid":
            ctx = err.get("ctx", {})
            return f"request body is not valid JSON: {ctx.get('error', err.get('msg'))}"
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        message = str(err.get("msg")).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return f"invalid {subject}: " + "; ".join(problems)


def parse_body(
    raw: bytes,
    model: type[BodyModel],
    *,
    subject: str = "request body",
    expect: str = "",
    empty_is_object: bool = True,
    context: dict[str, Any] | None = None,
) -> BodyModel:
    """``raw`` (JSON, whatever the content type said: clients differ) as a ``model``, or an
    :class:`ApiError` 400 saying what is wrong: not JSON, not an object (``expect`` names what
    was expected), or which fields are invalid (``invalid <subject>: ...``). An empty body is
    ``{}`` when ``empty_is_object``. ``context`` goes to the model's validators (e.g. the
    size caps of a job spec)."""
    try:
        data = orjson.loads(raw) if raw.strip() or not empty_is_object else {}
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}", "bad request") from None
    if not isinstance(data, dict):
        what = f" ({expect})" if expect else ""
        raise ApiError(400, f"request body must be a JSON object{what}", "bad request")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise ApiError(400, describe_validation(exc, subject), "bad request") from None


async def json_body(
    request: Request,
    model: type[BodyModel],
    *,
    subject: str = "request body",
    expect: str = "",
    empty_is_object: bool = True,
    context: dict[str, Any] | None = None,
) -> BodyModel:
    """The request's body as a ``model``: :func:`parse_body` of its bytes."""
    return parse_body(
        await request.body(),
        model,
        subject=subject,
        expect=expect,
        empty_is_object=empty_is_object,
        context=context,
    )
