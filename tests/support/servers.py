"""Real HTTP servers on 127.0.0.1 for the tests: one serves images, one receives webhooks."""

import contextlib
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Handler = Callable[[BaseHTTPRequestHandler], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        # A client killed mid-request (the crash tests SIGKILL the service) resets its
        # connections: expected, and not worth a traceback in the test output.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _BaseServer:
    def __init__(self, port: int = 0):
        self.hits: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        owner = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in separate writes; with Nagle's algorithm the body
            # would wait for the client's delayed ACK (about 40 ms a response).
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_GET(self):
                owner._handle(self)

            def do_POST(self):
                owner._handle(self)

        self._server = _Server(("127.0.0.1", port), RequestHandler)
        self.port = self._server.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        path = request.path.split("?")[0]
        with self._lock:
            self.hits[path] += 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.handle(path, request)

    def handle(self, path: str, request: BaseHTTPRequestHandler) -> None:
        raise NotImplementedError


def send(request: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None):
    request.send_response(status)
    headers = {"Content-Length": str(len(body)), **(headers or {})}
    for name, value in headers.items():
        request.send_header(name, value)
    request.end_headers()
    if body:
        request.wfile.write(body)


def delayed(body: bytes, seconds: float, content_type: str = "image/jpeg") -> Handler:
    """Answers 200 with body after waiting `seconds` (a slow image server)."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        send(request, 200, body, {"Content-Type": content_type})

    return handler


class UnpublishedImage:
    """An image its server answers 404 for until it is published, then 200."""

    def __init__(self, body: bytes):
        self.body = body
        self.published = threading.Event()

    def __call__(self, request) -> None:
        if self.published.is_set():
            send(request, 200, self.body, {"Content-Type": "image/jpeg"})
        else:
            send(request, 404, b"not yet", {"Content-Type": "text/plain"})


class LocalServer(_BaseServer):
    """Serves registered bodies or custom handlers by path."""

    def __init__(self):
        super().__init__()
        self._routes: dict[str, Handler] = {}

    def add(
        self,
        body: bytes,
        content_type: str = "image/jpeg",
        status: int = 200,
        suffix: str = ".img",
        headers=None,
    ) -> str:
        def handler(request):
            send(request, status, body, {"Content-Type": content_type, **(headers or {})})

        return self.add_handler(handler, suffix)

    def add_handler(self, handler: Handler, suffix: str = "") -> str:
        path = f"/{uuid.uuid4().hex}{suffix}"
        self._routes[path] = handler
        return self.base_url + path

    def hits_for(self, url: str) -> int:
        return self.hits.get(url.removeprefix(self.base_url), 0)

    def handle(self, path, request):
        handler = self._routes.get(path)
        if handler is None:
            send(request, 404, b"not found", {"Content-Type": "text/plain"})
        else:
            handler(request)


@dataclass
class ReceivedWebhook:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class _Inbox:
    statuses: list[int] = field(default_factory=list)  # answers to give, in order; then 200
    received: list[ReceivedWebhook] = field(default_factory=list)


class WebhookReceiver(_BaseServer):
    def __init__(self, port: int = 0):
        super().__init__(port)
        self._inboxes: dict[str, _Inbox] = defaultdict(_Inbox)
        self._arrived = threading.Condition()

    def new_url(self, fail_with: list[int] | None = None) -> str:
        path = f"/hook/{uuid.uuid4().hex}"
        self._inboxes[path].statuses = list(fail_with or [])
        return self.base_url + path

    def received(self, url: str) -> list[ReceivedWebhook]:
        return list(self._inboxes[url.removeprefix(self.base_url)].received)

    def wait_for(self, url: str, count: int = 1, timeout: float = 15) -> list[ReceivedWebhook]:
        deadline = time.monotonic() + timeout
        with self._arrived:
            while len(self.received(url)) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.wait(remaining)
        return self.received(url)

    def handle(self, path, request):
        length = int(request.headers.get("Content-Length", "0"))
        body = request.rfile.read(length)
        inbox = self._inboxes[path]
        status = inbox.statuses.pop(0) if inbox.statuses else 200
        with self._arrived:
            inbox.received.append(
                ReceivedWebhook({k.lower(): v for k, v in request.headers.items()}, body, time.monotonic())
            )
            self._arrived.notify_all()
        send(request, status, b"ok" if status < 300 else b"try again", {"Content-Type": "text/plain"})


def dripping_body(seconds_per_byte: float = 0.1, length: int = 1000) -> Handler:
    """A handler that sends valid headers, then the body one byte at a time."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(length))
        request.end_headers()
        for _ in range(length):
            request.wfile.write(b"x")
            request.wfile.flush()
            time.sleep(seconds_per_byte)

    return handler


def dripping_headers(seconds_per_byte: float = 0.1, length: int = 1000) -> Handler:
    """A handler that sends its status line and headers one byte at a time."""

    def handler(request: BaseHTTPRequestHandler) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * length:
            request.wfile.write(bytes([byte]))
            request.wfile.flush()
            time.sleep(seconds_per_byte)

    return handler


@dataclass
class HandlerRun:
    """What became of one observed handler: `ended` (at `ended_at`, time.monotonic) once it
    returned or the client hung up on it; `answered_in_full` only if it got to the end of
    its answer."""

    ended: threading.Event = field(default_factory=threading.Event)
    ended_at: float | None = None
    answered_in_full: bool = False


def observed(handler: Handler) -> tuple[Handler, HandlerRun]:
    """The handler, and a record of how its run ended: lets a test check the order of
    events ("the client gave up before the server had answered") instead of timing them."""
    run = HandlerRun()

    def observed_handler(request: BaseHTTPRequestHandler) -> None:
        try:
            handler(request)
            run.answered_in_full = True
        finally:
            run.ended_at = time.monotonic()
            run.ended.set()

    return observed_handler, run


class Origin(_BaseServer):
    """An image origin of its own (its own host:port, so its own host to the service's
    per-host politeness): serves one image at every path, after `delay_seconds`, and
    counts the requests it is answering at once (`most_in_flight`: the most it saw).

    Like a CDN, it answers 429 beyond `max_in_flight` requests at once, and 503 while
    `down_until` (time.monotonic) has not passed; both with `retry_after` as Retry-After
    when set. `answered` counts its answers by status."""

    def __init__(
        self,
        body: bytes,
        *,
        delay_seconds: float = 0.0,
        max_in_flight: int | None = None,
        retry_after: str | None = None,
    ):
        super().__init__()
        self.body = body
        self.delay_seconds = delay_seconds
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.down_until = 0.0
        self.in_flight = 0
        self.most_in_flight = 0
        self.answered: dict[int, int] = defaultdict(int)

    def urls(self, count: int) -> list[str]:
        return [f"{self.base_url}/{uuid.uuid4().hex}.jpg" for _ in range(count)]

    def down_for(self, seconds: float) -> None:
        self.down_until = time.monotonic() + seconds

    def handle(self, path, request):
        with self._lock:
            if time.monotonic() < self.down_until:
                status = 503
            elif self.max_in_flight is not None and self.in_flight >= self.max_in_flight:
                status = 429
            else:
                status = 200
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.answered[status] += 1
        if status != 200:
            headers = {"Content-Type": "text/plain"}
            if self.retry_after is not None:
                headers["Retry-After"] = self.retry_after
            send(request, status, b"slow down" if status == 429 else b"maintenance", headers)
            return
        try:
            time.sleep(self.delay_seconds)
            send(request, 200, self.body, {"Content-Type": "image/jpeg"})
        finally:
            with self._lock:
                self.in_flight -= 1


@dataclass
class RevalidatingSource:
    """An image an origin serves with validators, answering conditional requests as
    origins do: 304 when If-None-Match names the current ETag (or, without it,
    If-Modified-Since is the current Last-Modified). Change `body` and `etag` to publish
    a new version. `answers` holds (If-None-Match sent, status answered) per request."""

    body: bytes
    etag: str | None = '"v1"'
    last_modified: str | None = "Tue, 01 Dec 2026 10:00:00 GMT"
    headers: dict[str, str] = field(default_factory=dict)
    answers: list[tuple[str | None, int]] = field(default_factory=list)

    def handler(self, request: BaseHTTPRequestHandler) -> None:
        if_none_match = request.headers.get("If-None-Match")
        if_modified_since = request.headers.get("If-Modified-Since")
        if if_none_match is not None:
            unchanged = self.etag is not None and if_none_match == self.etag
        else:
            unchanged = if_modified_since is not None and if_modified_since == self.last_modified
        validators = {"ETag": self.etag, "Last-Modified": self.last_modified}
        headers = {name: value for name, value in validators.items() if value is not None}
        headers.update(self.headers)
        self.answers.append((if_none_match, 304 if unchanged else 200))
        if unchanged:
            request.send_response(304)
            for name, value in headers.items():
                request.send_header(name, value)
            request.end_headers()
            return
        send(request, 200, self.body, {"Content-Type": "image/jpeg", **headers})

    @property
    def statuses(self) -> list[int]:
        return [status for _, status in self.answers]
