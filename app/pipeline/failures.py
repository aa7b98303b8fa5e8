"""Typed failures of the pipeline stages.

Each failure has a stable machine code (shown to users in the status response) and a
human message.

Two kinds of "try again", on purpose distinct:
- `retryable` marks upstream trouble worth another request within the same download
  (timeouts, 429, 5xx): HttpFetcher retries those until the download deadline, and if
  the deadline passes the image fails for good, because the source is at fault.
- `transient` marks a failure that says nothing about the image: the image goes back to
  waiting, with backoff, and is tried again later; the request stays unfinished meanwhile.
  Every StoreFailure (app/storage: a full disk, storage away or throttling) is one.
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


class ConnectionFailed(FetchFailure):
    code = "connection_error"
    retryable = True


class TooManyRedirects(FetchFailure):
    code = "too_many_redirects"


class HttpError(FetchFailure):
    def __init__(self, status_code: int, reason: str = ""):
        super().__init__(
            f"the image server answered HTTP {status_code} {reason}".strip(),
            code=f"http_{status_code}",
            retryable=status_code == 429 or status_code >= 500,
        )
        self.status_code = status_code


class TooLarge(FetchFailure):
    code = "too_large"


def as_image_failure(failure: NetworkFailure) -> FetchFailure:
    """The image's failure for a network one: the same code, message and retryability."""
    image_failure = _FETCH_FAILURE_BY_CODE.get(failure.code, FetchFailure)(failure.message)
    image_failure.code = failure.code
    image_failure.retryable = failure.retryable
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
