"""One exception tree for every transport.

Each class carries its HTTP status, its OpenAI-style ``type`` and a stable ``code``. The HTTP
adapter maps any :class:`TabAgentError` to ``{"error": {"message", "type", "param", "code"}}``
in exactly one place (``tabagent.api.middleware``); native messaging and the data channel turn
the same exception into an ``error`` event carrying ``code`` and ``message``. Codes are part of
the wire contract: add new ones, never rename.

    TabAgentError                 500 server_error / internal_error
    ├── BadRequest                400 invalid_request_error / bad_request
    │   └── InvalidJSON           400 invalid_request_error / invalid_json
    ├── Unauthorized              401 authentication_error / invalid_api_key
    ├── Forbidden                 403 permission_error / forbidden
    ├── NotFound                  404 not_found_error / not_found
    ├── MethodNotAllowed          405 invalid_request_error / method_not_allowed
    ├── Conflict                  409 invalid_request_error / conflict
    │   └── SchemaTooNew          409 invalid_request_error / schema_too_new
    ├── PayloadTooLarge           413 invalid_request_error / request_too_large
    ├── ValidationFailed          422 invalid_request_error / validation_error
    ├── TooManyRequests           429 rate_limit_error / rate_limited
    ├── Cancelled                 499 invalid_request_error / cancelled
    ├── NotImplementedYet         501 server_error / not_implemented
    ├── StorageError              500 server_error / storage_error
    ├── DownloadError             502 server_error / download_failed
    │   └── ChecksumMismatch      502 server_error / checksum_mismatch
    ├── ServiceUnavailable        503 server_error / unavailable
    ├── Timeout                   504 server_error / timeout
    └── DiskError                 507 server_error / disk_error
"""

from __future__ import annotations

from typing import Any, ClassVar


class TabAgentError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]  # a per-instance refinement of the class code
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI-shaped error object (the value of the top-level ``error`` key)."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class BadRequest(TabAgentError):
    status = 400
    type = "invalid_request_error"
    code = "bad_request"


class InvalidJSON(BadRequest):
    code = "invalid_json"


class Unauthorized(TabAgentError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(TabAgentError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(TabAgentError):
    status = 404
    type = "not_found_error"
    code = "not_found"


class MethodNotAllowed(TabAgentError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(TabAgentError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class SchemaTooNew(Conflict):
    """A database written by a newer TabAgent: opening it could corrupt it."""

    code = "schema_too_new"


class PayloadTooLarge(TabAgentError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ValidationFailed(TabAgentError):
    status = 422
    type = "invalid_request_error"
    code = "validation_error"


class TooManyRequests(TabAgentError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class Cancelled(TabAgentError):
    """The caller cancelled the request (nginx's 499 "client closed request")."""

    status = 499
    type = "invalid_request_error"
    code = "cancelled"


class NotImplementedYet(TabAgentError):
    status = 501
    type = "server_error"
    code = "not_implemented"


class ServiceUnavailable(TabAgentError):
    status = 503
    type = "server_error"
    code = "unavailable"


class Timeout(TabAgentError):
    status = 504
    type = "server_error"
    code = "timeout"


class StorageError(TabAgentError):
    code = "storage_error"


class DownloadError(TabAgentError):
    status = 502
    type = "server_error"
    code = "download_failed"


class ChecksumMismatch(DownloadError):
    code = "checksum_mismatch"


class DiskError(TabAgentError):
    status = 507
    type = "server_error"
    code = "disk_error"
