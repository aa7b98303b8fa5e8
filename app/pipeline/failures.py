"""Typed failures of the pipeline stages.

Each failure has a stable machine code (shown to users in the status response) and a
human message. `retryable` marks transient upstream trouble worth another try.
"""


class ImageFailure(Exception):
    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable


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


class CompressFailure(ImageFailure):
    code = "compress_failed"


class NotAnImage(CompressFailure):
    code = "not_an_image"


class DecompressionBomb(CompressFailure):
    code = "decompression_bomb"


class CorruptImage(CompressFailure):
    code = "corrupt_image"


class StoreFailure(ImageFailure):
    code = "storage_error"


class OverMemoryBudget(CompressFailure):
    """Decoding the image would take more memory than a worker may use (WORKER_MEMORY_MB)
    even with nothing else running: refused from its header, before any pixel is decoded."""

    code = "over_memory_budget"
