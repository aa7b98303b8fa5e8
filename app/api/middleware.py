"""ASGI middleware of the API."""

import logging
import time
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match, Mount

from app.api.errors import problem_response
from app.config import Settings
from app.metrics import UNMATCHED_ROUTE, ServiceMetrics, method_label

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


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Probes and load balancers often name the address they connect to; these answer no data.
ANY_HOST_PATHS = frozenset({"/healthz", "/readyz"})


def allowed_host_names(settings: Settings) -> frozenset[str] | None:
    """The names a request's Host may carry; None allows any (ALLOWED_HOSTS=*)."""
    listed = {name.strip().lower().strip("[]") for name in settings.allowed_hosts.split(",") if name.strip()}
    if "*" in listed:
        return None
    public_host = urlsplit(settings.public_base_url).hostname if settings.public_base_url else None
    bound = settings.host.strip().lower().strip("[]")
    names = listed | {name for name in (public_host, bound) if name}
    if bound in LOOPBACK_NAMES or bound in WILDCARD_ADDRESSES:
        names |= LOOPBACK_NAMES
    return frozenset(names - WILDCARD_ADDRESSES)


def _host_name(host_header: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class BrowserRequestGuard:
    """Refuses what only a hostile web page would send: a Host this service does not go by
    (DNS rebinding: a page of the attacker's name reads the answers) and, from a browser,
    a state-changing request made by another site (a form post to an open service).

    Clients that are not browsers send neither Origin nor Sec-Fetch-Site and pass. With
    API_KEYS set the checks stay on: they cost a legitimate client nothing there, and the
    pages and /docs are served without a key.
    """

    def __init__(self, app, settings: Settings):
        self.app = app
        self.host_names = allowed_host_names(settings)
        public = urlsplit(settings.public_base_url) if settings.public_base_url else None
        self.public_origin = f"{public.scheme}://{public.netloc}".lower() if public else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        if (
            self.host_names is not None
            and host
            and scope["path"] not in ANY_HOST_PATHS
            and _host_name(host) not in self.host_names
        ):
            response = problem_response(
                400,
                "Unknown host",
                "this service does not answer to the host name the request names; "
                "add it to ALLOWED_HOSTS if it is one of the service's own",
                slug="unknown-host",
            )
            return await response(scope, receive, send)
        if scope["method"] not in SAFE_METHODS and self._cross_site(headers, host):
            response = problem_response(
                403,
                "Cross-site request refused",
                "a page of another site cannot make this service change anything; "
                "send the request from the service's own pages or from a client that is not a browser",
                slug="cross-site-request",
            )
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)

    def _cross_site(self, headers: dict[bytes, bytes], host: str) -> bool:
        origin = headers.get(b"origin")
        if origin is not None:
            origin_text = origin.decode("latin-1").strip().lower()
            if origin_text == self.public_origin:
                return False
            # "null" (a sandboxed frame, a file) has no netloc and never matches.
            return urlsplit(origin_text).netloc != host.strip().lower() or not host
        fetch_site = headers.get(b"sec-fetch-site", b"").decode("latin-1").strip().lower()
        return fetch_site in ("cross-site", "same-site")


def route_template(scope, entry_scope=None) -> str:
    """The template of the route that served a request (`/status/{request_id}`), never
    the raw path: it becomes a metric label and must not carry ids. `entry_scope` is the
    scope as the request arrived, to find the routes FastAPI does not name in the scope."""
    route = scope.get("route") or _route_matching(entry_scope or scope)
    if route is None:
        return UNMATCHED_ROUTE
    path = getattr(route, "path", None) or UNMATCHED_ROUTE
    if isinstance(route, Mount):
        return f"{path}/{{path}}"
    return path


def _route_matching(scope) -> BaseRoute | None:
    """FastAPI puts its own routes (APIRoute) in the scope but not plain ones (/docs,
    /openapi.json) nor mounts: those are matched again, as the router matched them."""
    router = getattr(scope.get("app"), "router", None)
    partial = None
    for route in getattr(router, "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


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
        # Routing rewrites path and root_path in place (mounts): keep them as they came.
        entry_scope = {**scope}
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
            route = route_template(scope, entry_scope)
            method = method_label(scope["method"])
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
