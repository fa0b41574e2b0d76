"""How the HTTP API answers what goes wrong: always an OpenAI-style error body
(``cluster.openai.responses.error_payload``). Bad input is a 400, naming the field at fault; an
unknown path a 404; a replica that broke or died a 503 (retry); anything unforeseen a 500 whose
details go to the log, not out. ``add_error_handlers`` installs the answers on the ingress's app."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from ray.exceptions import RayActorError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster.openai.responses import Body, error_payload
from replica.errors import ReplicaBroken, RequestRejected

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.payload = status, error_payload(message, kind, param, code)


def json_response(body: Body, status: int = 200, replica: str | None = None) -> Response:
    """A JSON response of the body (with the replica that served it in a header, when one did:
    for operators and tests)."""
    headers = None if replica is None else {"x-vattn-replica": replica}
    return Response(body.to_json(), status, headers, media_type="application/json")


def rejection(error: RequestRejected | ReplicaBroken) -> str:
    """The replica's reason, without Ray's traceback (which names hosts and pids)."""
    return str(getattr(error, "cause", None) or error)


def replica_lost(error: ReplicaBroken | RayActorError) -> str:
    """Why a request's replica cannot answer: a rank died (the replica is broken) or the replica
    died; either way Serve is replacing it, and the client should retry."""
    if isinstance(error, ReplicaBroken):
        return f"the replica is unavailable, retry: {rejection(error)}"
    return "the replica serving this request died; retry"


def context_exceeded(prompt_tokens: int, context: int, param: str) -> ApiError:
    return ApiError(
        400,
        f"prompt ({prompt_tokens} tokens) + at least 1 generated token exceeds the context limit "
        f"of {context} tokens",
        param=param,
        code="context_length_exceeded",
    )


# ---- the app's exception handlers ----------------------------------------------------------------
async def answer_api_error(_: Request, error: ApiError) -> Response:
    return json_response(error.payload, error.status)


async def answer_unexpected(_: Request, error: Exception) -> Response:
    """Anything unforeseen is still an OpenAI-style body (the details go to the log, not out)."""
    log.exception("request failed", exc_info=error)
    return json_response(error_payload("internal error", "server_error"), 500)


#: Validation errors' types -> the OpenAI error code they are answered with.
_CODES = {
    "unsupported_field": "unsupported_parameter",
    "extra_forbidden": "unknown_parameter",
    "invalid_unicode": "invalid_value",
}


async def answer_validation_error(_: Request, error: RequestValidationError) -> Response:
    problems = error.errors()
    first = problems[0] if problems else {}
    param = None if first.get("type") == "json_invalid" else _path(first) or None
    message = "; ".join(_describe(e) for e in problems) or "invalid request"
    payload = error_payload(message, param=param, code=_CODES.get(first.get("type", "")))
    return json_response(payload, 400)


def _where(problem: Any) -> str:
    """The place of a problem in the body (``messages.0.content``), "" for the body itself."""
    return ".".join(str(part) for part in problem.get("loc", ()) if part != "body")


def _path(problem: Any) -> str:
    """The problem's field: its place, and the field a model validator names under it."""
    field = (problem.get("ctx") or {}).get("field")
    return ".".join(part for part in (_where(problem), field) if part)


def _describe(problem: Any) -> str:
    kind, where = problem.get("type"), _where(problem)
    if kind == "json_invalid":
        return f"the body is not valid JSON ({problem.get('ctx', {}).get('error', 'parse error')})"
    if kind == "extra_forbidden":
        return f"{where}: unknown field (not part of the API vattn serves)"
    if (problem.get("ctx") or {}).get("field") is not None and not where:
        return str(problem.get("msg"))  # a model validator's message names its field
    return f"{where or 'body'}: {problem.get('msg')}"


async def answer_http_error(_: Request, error: StarletteHTTPException) -> Response:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return json_response(error_payload(str(error.detail), kind), error.status_code)


def add_error_handlers(app: FastAPI) -> None:
    """Every failure of ``app``'s requests answered with an OpenAI-style body."""
    app.add_exception_handler(ApiError, answer_api_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, answer_unexpected)
    app.add_exception_handler(RequestValidationError, answer_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, answer_http_error)  # type: ignore[arg-type]
