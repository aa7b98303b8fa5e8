"""Fetch stage: download one untrusted URL into memory, within hard limits.

Connections go through app/net/guard.py (the address policy, the wall-clock deadline).
Here: redirects are followed by hand, so every hop goes through the same checks, and
capped; while reading, the decoded size is capped (a gzip bomb is cut off), and so is the
total wall-clock time (a server dripping one byte a second is cut off).

Given what an earlier download of the URL told (app/ledger/revalidation.py), the request
is conditional: `304 Not Modified` then comes back as a FetchedImage with no bytes and
`not_modified` set. Every download reports the origin's validators and the hash of its
bytes, to be remembered for the next import.
"""

import hashlib
import http.client
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urljoin

import urllib3
from urllib3.exceptions import (
    LocationValueError,
    NameResolutionError,
    NewConnectionError,
)

from app.ledger.units import SourceState
from app.net.failures import NetworkFailure
from app.net.guard import USER_AGENT, wall_clock_deadline
from app.net.urls import check_url
from app.pipeline.failures import (
    ConnectionFailed,
    FetchFailure,
    HttpError,
    ImageFailure,
    InvalidUrl,
    TooLarge,
    TooManyRedirects,
    UpstreamTimeout,
    as_image_failure,
)

READ_CHUNK_BYTES = 256 * 1024
REQUEST_HEADERS = {
    "User-Agent": USER_AGENT,
    "Accept": "image/*,*/*;q=0.5",
    "Accept-Encoding": "gzip, deflate",
}
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class FetchedImage:
    data: bytes | bytearray  # the buffer it was read into: no second copy of a large image
    final_url: str
    content_type: str | None
    source: SourceState | None = None  # validators and hash; on a 304, the ones asked with
    not_modified: bool = False  # a conditional request answered 304: no bytes came


def _no_store(cache_control: str | None) -> bool:
    if not cache_control:
        return False
    return any(part.split("=", 1)[0].strip().lower() == "no-store" for part in cache_control.split(","))


def conditional_headers(known: SourceState | None) -> dict[str, str]:
    if known is None or not (known.etag or known.last_modified):
        return REQUEST_HEADERS  # not conditional: a 304 to it is an error like any other
    headers = dict(REQUEST_HEADERS)
    if known.etag:
        headers["If-None-Match"] = known.etag
    if known.last_modified:
        headers["If-Modified-Since"] = known.last_modified
    return headers


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header as seconds from now: delay-seconds or an HTTP date (RFC 9110
    10.2.3); None when absent or unreadable. The caller caps it."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an obsolete date form without a zone: HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


class HttpFetcher:
    """Downloads images, retrying at once within the deadline what may pass in a moment
    (timeouts, broken connections, 5xx but 503); a 429 or 503 is left to the host's
    backoff (app/ledger)."""

    def __init__(
        self,
        http: urllib3.PoolManager,
        *,
        timeout_seconds: float,
        max_bytes: int,
        max_redirects: int = 5,
        retries: int = 2,
        retry_backoff_seconds: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.http = http
        self.timeout_seconds = timeout_seconds
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.retries = retries
        self.retry_backoff_seconds = retry_backoff_seconds
        self.sleep = sleep

    def fetch(self, url: str, known: SourceState | None = None) -> FetchedImage:
        """One deadline covers every attempt, so an image never takes longer than the
        timeout however the server misbehaves. With `known` (an earlier download's
        validators), the request is conditional and may come back not_modified."""
        deadline = time.monotonic() + self.timeout_seconds
        for attempt in range(self.retries + 1):
            try:
                with wall_clock_deadline(deadline):
                    return self._fetch_once(url, deadline, known)
            except ImageFailure as failure:
                backoff = self.retry_backoff_seconds * 2**attempt
                if not failure.retryable or attempt == self.retries:
                    raise
                if time.monotonic() + backoff >= deadline:
                    raise
            self.sleep(backoff)
        raise AssertionError("unreachable")

    def _fetch_once(self, url: str, deadline: float, known: SourceState | None) -> FetchedImage:
        headers = conditional_headers(known)
        for _hop in range(self.max_redirects + 1):
            try:
                check_url(url)
            except NetworkFailure as failure:
                raise as_image_failure(failure) from failure
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out()
            try:
                response = self.http.request(
                    "GET",
                    url,
                    headers=headers,
                    preload_content=False,
                    redirect=False,
                    retries=False,
                    timeout=urllib3.Timeout(connect=remaining, read=remaining),
                )
            except NetworkFailure as failure:  # the address policy refused or could not resolve
                raise as_image_failure(failure) from failure
            except (LocationValueError, http.client.InvalidURL) as exc:
                raise InvalidUrl(f"malformed URL: {exc}") from exc
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as exc:
                # urllib3 derives "could not connect" from its timeout class; it is not one.
                timed_out = isinstance(exc, (TimeoutError, urllib3.exceptions.TimeoutError))
                if (timed_out and not isinstance(exc, NewConnectionError)) or time.monotonic() >= deadline:
                    raise self._timed_out() from exc
                raise ConnectionFailed(_connection_message(exc)) from exc
            complete = False
            try:
                location = response.headers.get("location")
                if response.status in REDIRECT_STATUSES and location:
                    url = urljoin(url, location)
                    continue
                no_store = _no_store(response.headers.get("cache-control"))
                if response.status == 304 and known is not None and headers is not REQUEST_HEADERS:
                    complete = True
                    # A 304 may carry fresher validators; the bytes are the ones we hashed.
                    source = SourceState(
                        content_sha256=known.content_sha256,
                        etag=response.headers.get("etag") or known.etag,
                        last_modified=response.headers.get("last-modified") or known.last_modified,
                        no_store=no_store,
                    )
                    return FetchedImage(b"", url, None, source=source, not_modified=True)
                if response.status != 200:
                    raise HttpError(
                        response.status,
                        response.reason or "",
                        retry_after_seconds=retry_after_seconds(response.headers.get("retry-after")),
                    )
                data = self._read_body(response, deadline)
                complete = True
                source = SourceState(
                    content_sha256=hashlib.sha256(data).hexdigest(),
                    etag=response.headers.get("etag"),
                    last_modified=response.headers.get("last-modified"),
                    no_store=no_store,
                )
                return FetchedImage(data, url, response.headers.get("content-type"), source=source)
            finally:
                if not complete:  # unread bytes would spoil the connection for the next request
                    response.close()
                response.release_conn()
        raise TooManyRedirects(f"more than {self.max_redirects} redirects")

    def _timed_out(self) -> UpstreamTimeout:
        return UpstreamTimeout(f"the image did not arrive within {self.timeout_seconds:g} s")

    def _read_body(self, response: urllib3.BaseHTTPResponse, deadline: float) -> bytearray:
        declared = response.headers.get("content-length", "")
        encoded = response.headers.get("content-encoding", "identity").lower()
        if declared.isdigit() and encoded == "identity" and int(declared) > self.max_bytes:
            raise TooLarge(f"the image is {int(declared)} bytes; the limit is {self.max_bytes}")
        body = bytearray()
        try:
            while True:
                # read1 returns what one socket read gives, so the deadline is checked
                # often even when the server sends a byte at a time; decoded output is
                # capped per call, so a compressed bomb never inflates in one piece.
                chunk = response.read1(READ_CHUNK_BYTES, decode_content=True)
                if not chunk:
                    break
                body += chunk
                if len(body) > self.max_bytes:
                    raise TooLarge(f"the image is larger than {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise self._timed_out()
        except ImageFailure:
            raise
        except TimeoutError as exc:
            raise self._timed_out() from exc
        except Exception as exc:  # urllib3 and http.client raise many kinds on a broken body
            if "timed out" in str(exc).lower() or time.monotonic() >= deadline:
                raise self._timed_out() from exc
            raise FetchFailure(
                f"the download broke off: {exc}", code="broken_download", retryable=True, transient=True
            ) from exc
        if time.monotonic() >= deadline:  # the reaper's shutdown can look like a clean end
            raise self._timed_out()
        return body


def _connection_message(exc: Exception) -> str:
    for cause in _causes(exc):
        if isinstance(cause, NameResolutionError):
            return "the host name could not be resolved"
        if isinstance(cause, ConnectionRefusedError):
            return "the connection was refused"
    return f"could not connect: {exc.__class__.__name__}"


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = (
            exc.__cause__
            or exc.__context__
            or (exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else None)
        )
