"""One JSON error shape for the admin API: `{"error": {"code": ..., "message": ...}}`, never a traceback."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class ControlError(Exception):
    """An error a client can act on; `message` must never carry a secret."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        body = {"error": {"code": self.code, "message": self.message}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def unauthorized(message: str = "authentication required") -> ControlError:
    return ControlError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="bastion"'})


def forbidden(message: str = "your role does not allow this") -> ControlError:
    return ControlError(403, "forbidden", message)


def not_found(what: str = "resource") -> ControlError:
    """Also what a tenant-admin gets for another tenant's things: their existence is not disclosed."""
    return ControlError(404, "not_found", f"{what} not found")


def bad_request(message: str, code: str = "invalid_value") -> ControlError:
    return ControlError(422, code, message)


def conflict(message: str) -> ControlError:
    return ControlError(409, "conflict", message)
