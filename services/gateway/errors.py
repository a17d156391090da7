"""OpenAI-style errors: one exception type, its HTTP status and its JSON body.

Contract: everything the gateway refuses or fails raises `APIError`; the HTTP layer turns it into
`{"error": {"message", "type", "param", "code"}}` with `status`. `from_grpc` maps a worker's
status to what the client should see: its input was bad (400), nothing can serve it now (503),
it took too long (504), or the worker failed (500).
"""

from __future__ import annotations

import grpc

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_server_error",
          503: "service_unavailable", 504: "timeout"}

_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}

# worker statuses that say "your input": retrying elsewhere would fail the same way
CLIENT_FAULT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPES.get(status, "api_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}

    @classmethod
    def from_grpc(cls, error: grpc.aio.AioRpcError, what: str) -> APIError:
        """`what` names the leg, e.g. "decode worker 127.0.0.1:30001"."""
        status = _GRPC_TO_HTTP.get(error.code(), 500)
        details = error.details() or error.code().name
        message = details if status == 400 else f"{what}: {details}"
        return cls(status, message, code=error.code().name.lower())


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None)
