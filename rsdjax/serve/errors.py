"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, shared by server and router."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def model_not_found(message: str) -> APIError:
    return APIError(404, message, type="not_found_error", param="model", code="model_not_found")


def server_busy(message: str, retry_after: int = 1) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="server_busy",
                    headers={"Retry-After": str(retry_after)})


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable")


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    def path(err) -> list[str]:
        # pydantic tags union members in the location ("prompt", "list[int]", 0): keep only the field path
        return [str(p) for p in err.get("loc", ()) if p != "body" and not _is_type_tag(p)]

    # a value failing a union fails every member; the deepest location says best what is wrong
    err = max(exc.errors(), key=lambda e: len(path(e)))
    loc = path(err)
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "missing":
        return f"{param}: field required", param
    if err.get("type") == "extra_forbidden":
        return f"{param}: unknown field", param
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return bad_request(message, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", type=kind).response()
