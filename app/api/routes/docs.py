"""GET /docs: Swagger UI, served from this service with the pages' kind of CSP.

Its files come from a pinned package (swagger-ui-bundle-v2, Apache-2.0, the licence in its
dist-info), never from a CDN: /docs runs on the origin whose pages keep the API key in
sessionStorage, so it must not run scripts someone else can change. Only the files the
page uses are served; the package's own index.html would load a demo document from afar.
"""

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from swagger_ui_bundle import swagger_ui_path

from app.api.html import CONTENT_SECURITY_POLICY, PAGE_HEADERS, templates
from app.errors import NotFound

router = APIRouter(include_in_schema=False)

SWAGGER_UI_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
# The pages' policy, but Swagger UI draws its icons from data: URLs in its stylesheet.
DOCS_HEADERS = {
    **PAGE_HEADERS,
    "Content-Security-Policy": "; ".join(
        "img-src 'self' data:" if directive.startswith("img-src") else directive
        for directive in CONTENT_SECURITY_POLICY.split("; ")
    ),
}


@router.get("/docs")
def docs_page(request: Request) -> Response:
    return templates.TemplateResponse(
        request, "docs.html", {"openapi_url": request.app.openapi_url}, headers=DOCS_HEADERS
    )


@router.get("/docs/swagger-ui/{name}")
def swagger_ui_file(name: str) -> Response:
    media_type = SWAGGER_UI_FILES.get(name)
    if media_type is None:
        raise NotFound(f"no Swagger UI file named {name}")
    return FileResponse(
        swagger_ui_path / name,
        media_type=media_type,
        # The package is pinned: a file changes only with an upgrade, which restarts the service.
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )
