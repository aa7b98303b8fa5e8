"""ASGI middleware of the API."""

import logging
import time

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount

from app.api.errors import problem_response
from app.metrics import UNMATCHED_ROUTE, ServiceMetrics

access_log = logging.getLogger("app.access")

MULTIPART_OVERHEAD_BYTES = 64 * 1024


class UploadSizeLimit:
    """Refuse an upload body past MAX_CSV_BYTES before it is spooled to disk."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/upload":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            response = problem_response(
                413,
                "The upload is too large",
                self._detail(),
                slug="payload-too-large",
                headers={"Connection": "close"},
            )
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # An HTTPException passes through the form parser to the handlers.
                    raise StarletteHTTPException(413, self._detail())
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self) -> str:
        return f"the upload is larger than {self.max_body_bytes - MULTIPART_OVERHEAD_BYTES} bytes"


def route_template(scope) -> str:
    """The template of the route that served a request (`/status/{request_id}`), never
    the raw path: it becomes a metric label and must not carry ids."""
    route = scope.get("route")
    if route is None:
        return UNMATCHED_ROUTE
    path = getattr(route, "path", None) or UNMATCHED_ROUTE
    if isinstance(route, Mount):
        return f"{path}/{{path}}"
    return path


class AccessLog:
    """Times every HTTP request: one access line (method, route, status, duration) and an
    observation of image_service_http_request_seconds."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client gets if nothing is sent (the server answers 500)

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            seconds = time.perf_counter() - start
            route = route_template(scope)
            method = scope["method"]
            self.metrics.observe_http(method, route, status, seconds)
            access_log.info(
                "%s %s %d %.1f ms",
                method,
                route,
                status,
                seconds * 1000,
                extra={
                    "method": method,
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                },
            )
