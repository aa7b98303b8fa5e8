"""Typed failures of the pipeline stages.

Each failure has a stable machine code (shown to users in the status response) and a
human message.

Two kinds of "try again", on purpose distinct:
- `retryable` marks upstream trouble worth another request within the same download
  (timeouts, a refused or reset connection, 5xx but 503): HttpFetcher retries those
  until the download deadline. A 429 or 503 is never retried at once: the origin asked
  for fewer requests.
- `transient` marks a failure that says nothing about the image: the image goes back to
  waiting, with backoff, and is tried again later; the request stays unfinished meanwhile.
  Every StoreFailure (app/storage: a full disk, storage away or throttling) is one, and
  so is an origin's passing trouble (TRANSIENT_HTTP_STATUSES, timeouts, connections
  refused or broken): then the whole host backs off (`retry_after_seconds` when the
  origin said), and the image waits at most FETCH_RETRY_WINDOW_SECONDS (app/ledger).
"""

from app.net.failures import NetworkFailure


class ImageFailure(Exception):
    code = "internal_error"
    retryable = False
    transient = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool | None = None,
        transient: bool | None = None,
    ):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        if transient is not None:
            self.transient = transient


class FetchFailure(ImageFailure):
    code = "fetch_failed"


class InvalidUrl(FetchFailure):
    code = "invalid_url"


class BlockedAddress(FetchFailure):
    code = "blocked_address"


class UpstreamTimeout(FetchFailure):
    code = "timeout"
    retryable = True
    transient = True


class ConnectionFailed(FetchFailure):
    code = "connection_error"
    retryable = True
    transient = True


class TooManyRedirects(FetchFailure):
    code = "too_many_redirects"


# Answers that say the origin is busy or briefly away, not that the image is wrong.
TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Answers that ask for fewer requests: the host backs off, nothing is retried at once.
SLOW_DOWN_HTTP_STATUSES = frozenset({429, 503})


class HttpError(FetchFailure):
    def __init__(self, status_code: int, reason: str = "", *, retry_after_seconds: float | None = None):
        super().__init__(
            f"the image server answered HTTP {status_code} {reason}".strip(),
            code=f"http_{status_code}",
            retryable=status_code >= 500 and status_code not in SLOW_DOWN_HTTP_STATUSES,
            transient=status_code in TRANSIENT_HTTP_STATUSES,
        )
        self.status_code = status_code
        self.retry_after_seconds = retry_after_seconds  # the origin's Retry-After, if any


class TooLarge(FetchFailure):
    code = "too_large"


def as_image_failure(failure: NetworkFailure) -> FetchFailure:
    """The image's failure for a network one: the same code, message and retryability
    (a name the resolver says does not exist is neither retried nor waited for)."""
    image_failure = _FETCH_FAILURE_BY_CODE.get(failure.code, FetchFailure)(failure.message)
    image_failure.code = failure.code
    image_failure.retryable = failure.retryable
    image_failure.transient = image_failure.transient and failure.retryable
    return image_failure


_FETCH_FAILURE_BY_CODE: dict[str, type[FetchFailure]] = {
    failure.code: failure for failure in (InvalidUrl, BlockedAddress, ConnectionFailed)
}


class CompressFailure(ImageFailure):
    code = "compress_failed"


class NotAnImage(CompressFailure):
    code = "not_an_image"


class DecompressionBomb(CompressFailure):
    code = "decompression_bomb"


class CorruptImage(CompressFailure):
    code = "corrupt_image"


class OverMemoryBudget(CompressFailure):
    """Decoding the image would take more memory than an image process may use (IMAGE_MEMORY_MB)
    even with nothing else running: refused from its header, before any pixel is decoded."""

    code = "over_memory_budget"
