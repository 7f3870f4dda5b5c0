"""Errors as OpenAI's API returns them: a status code and `{"error": {message, type, param, code}}`."""
from __future__ import annotations

from salmonn_cli.errors import SalmonnError

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_salmonn_error(error: SalmonnError, param: str | None = None) -> APIError:
    """What the CLI says in one line for a bad file or option is the client's 400."""
    return bad_request(str(error), param=param)
