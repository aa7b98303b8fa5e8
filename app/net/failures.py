"""Failures of outbound HTTP, before or while connecting: the URL, the address policy, the
connection. Each has a stable code; the pipeline reports them as the image's error code,
the webhook deliverer as the attempt's error."""


class NetworkFailure(Exception):
    code = "connection_error"
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidUrl(NetworkFailure):
    code = "invalid_url"


class BlockedAddress(NetworkFailure):
    code = "blocked_address"


class ConnectionFailed(NetworkFailure):
    code = "connection_error"
    retryable = True


class UnknownHost(ConnectionFailed):
    """The resolver says the name does not exist: trying again later will not help."""

    retryable = False
