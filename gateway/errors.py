"""Every error a client can see, each fixing its HTTP status and OpenAI-style type and code.

    GatewayError
    ├── ClientError                   4xx: the request itself is at fault
    │   ├── BadRequest                400 invalid_json / missing_model
    │   ├── Unauthorized              401 invalid_api_key
    │   ├── Forbidden                 403 model_not_allowed / origin_not_allowed / host_not_allowed
    │   ├── NotFound                  404 route_not_found / model_not_found
    │   ├── MethodNotAllowed          405 method_not_allowed (with Allow)
    │   ├── RequestTimeout            408 request_timeout (the body did not arrive in time)
    │   ├── PayloadTooLarge           413 request_too_large
    │   ├── TooManyRequests           429 concurrency_limit (a route's max_concurrency)
    │   │   └── RateLimited           429 rate_limit_exceeded (a key's limits, with Retry-After)
    │   │       └── QuotaExceeded     429 insufficient_quota (a key's tokens_per_day)
    │   └── HeadersTooLarge           431 headers_too_large
    └── UpstreamError                 5xx: the gateway could not get an answer
        ├── CredentialUnavailable     502 credential_unavailable (IAM down, wrong password, ...)
        ├── UpstreamAuthRejected      502 upstream_auth_rejected (a fresh token was refused too)
        ├── UpstreamUnreachable       502 upstream_unreachable
        ├── UpstreamTimeout           504 upstream_timeout (no response headers within first_byte)
        └── ServiceUnavailable        503 draining / buffer_full
            └── LimitsUnavailable     503 limits_unavailable (limits_store.on_error: deny)

Messages are fixed text written here or by the raiser; they never carry a header value, a body,
a token or a password. Details for operators go to the log, keyed by request id.
"""

from __future__ import annotations

import json


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    closes = False  # the connection cannot carry another request after this answer

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        """The OpenAI-shaped JSON error body."""
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type_: str, code: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}
    ).encode()


class ClientError(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class BadRequest(ClientError):
    status = 400
    code = "invalid_json"


class Unauthorized(ClientError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ClientError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ClientError):
    status = 404
    code = "route_not_found"


class MethodNotAllowed(ClientError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, method: str, allow: tuple[str, ...]) -> None:
        # the method is a token (the C parser refuses anything else): safe to echo, bounded
        super().__init__(f"method {method[:20]} is not allowed here", code=None)
        self.allow = ", ".join(allow)


class RequestTimeout(ClientError):
    status = 408
    code = "request_timeout"
    closes = True  # part of the body may still come


class HeadersTooLarge(ClientError):
    status = 431
    code = "headers_too_large"


class PayloadTooLarge(ClientError):
    status = 413
    code = "request_too_large"


class TooManyRequests(ClientError):
    status = 429
    type = "rate_limit_error"
    code = "concurrency_limit"


class RateLimited(TooManyRequests):
    """A key over one of its limits; ``retry_after``: whole seconds until it is admitted again.

    Type and code as OpenAI's own rate-limit answers (``requests`` or ``tokens``,
    ``rate_limit_exceeded``), which its SDKs raise as ``RateLimitError``.
    """

    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, type_: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        if type_ is not None:
            self.type = type_


class QuotaExceeded(RateLimited):
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class CredentialUnavailable(UpstreamError):
    code = "credential_unavailable"


class UpstreamAuthRejected(UpstreamError):
    code = "upstream_auth_rejected"


class UpstreamUnreachable(UpstreamError):
    code = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    status = 504
    type = "timeout"
    code = "upstream_timeout"


class ServiceUnavailable(UpstreamError):
    status = 503
    type = "server_error"
    code = "draining"


class LimitsUnavailable(ServiceUnavailable):
    code = "limits_unavailable"
