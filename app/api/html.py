"""HTML for people: Jinja2 templates (autoescaped), the Content-Security-Policy every page
carries, and routes that answer only browsers.

Pages are shells: they hold no data of a request. Their scripts (app/static/) fetch the
JSON API with the API key the person typed, so a page can be served without a key and
the API's access rules stay the only ones.
"""

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

APP_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = APP_ROOT / "templates"
STATIC_DIR = APP_ROOT / "static"

# Scripts and styles only from files this service serves: a product name or URL that
# slips past escaping still cannot run. No cookies are used; cross-site form posts are
# refused by the middleware (app/api/middleware.py) all the same.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        # Pages show thumbnails, which this service always serves; full outputs (maybe on
        # MEDIA_PUBLIC_BASE_URL) are only linked to, which img-src does not govern.
        "img-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

templates = Jinja2Templates(directory=TEMPLATES_DIR)


def render_page(request: Request, template: str, context: dict[str, Any] | None = None) -> Response:
    settings = request.app.state.settings
    return templates.TemplateResponse(
        request,
        template,
        {"api_key_required": bool(settings.api_key_list), **(context or {})},
        headers=PAGE_HEADERS,
    )


def accepts_html(accept_header: str) -> bool:
    """Browsers ask for text/html on navigation; API clients (curl: */*) do not."""
    return "text/html" in accept_header


class BrowserRoute(APIRoute):
    """A route that only matches when the client asks for HTML; any other request falls
    through to the JSON route of the same path, which stays exactly as it was."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is Match.FULL:
            accept = dict(scope["headers"]).get(b"accept", b"").decode("latin-1")
            if not accepts_html(accept):
                return Match.NONE, {}
        return match, child_scope
