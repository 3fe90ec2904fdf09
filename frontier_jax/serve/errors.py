"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with the HTTP status.

Request validation (pydantic) errors become one 400 naming the parameters: unknown fields are
listed together ("unknown fields: a, b"), the first other problem names its field and rule."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": TYPES.get(status, "server_error"),
            "param": param,
            "code": status,
        }
    }


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param), err.status, headers=err.headers)


def validation_error(err: ValidationError) -> APIError:
    """The 400 of a request body that does not fit its model (module docstring)."""
    problems = err.errors(include_url=False)
    unknown = [".".join(map(str, p["loc"])) for p in problems if p["type"] == "extra_forbidden"]
    if unknown:
        return APIError(400, f"unknown fields: {', '.join(unknown)}", unknown[0])
    first = problems[0]
    param = str(first["loc"][0]) if first["loc"] else None
    given = repr(first.get("input"))
    given = given if len(given) <= 80 else given[:77] + "..."
    return APIError(400, f"{param or 'body'}: {first['msg']} (got {given})", param)
