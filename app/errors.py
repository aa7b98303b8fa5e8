"""The service's errors, as the domain sees them: each has a stable type slug and a title.

Services raise these; nothing here knows about HTTP. app/api/errors.py gives each kind
its status code and renders it as RFC 9457 problem+json.
"""

from typing import Any


class ServiceError(Exception):
    """An error the client should see, with a stable type slug."""

    slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.headers = headers
        self.extra = extra


class NotFound(ServiceError):
    slug, title = "not-found", "Not found"


class Conflict(ServiceError):
    slug, title = "conflict", "Conflict"


class InvalidCsv(ServiceError):
    slug, title = "invalid-csv", "The CSV cannot be accepted"


class InvalidInput(ServiceError):
    slug, title = "invalid-input", "The request is not valid"


class PayloadTooLarge(ServiceError):
    slug, title = "payload-too-large", "The upload is too large"


class Unauthorized(ServiceError):
    slug, title = "unauthorized", "Authentication required"


class ServiceUnavailable(ServiceError):
    slug, title = "unavailable", "Service unavailable"
