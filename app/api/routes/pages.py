"""The pages people use: upload, a request's progress and results, the list of requests.

Each answers with a shell (app/templates/) that holds no data of a request; its script
fetches the JSON API with the person's API key. `/` and `/requests` answer browsers only
(BrowserRoute) and leave the JSON answers of those paths to API clients.
"""

from fastapi import APIRouter, Request, Response

from app.api.html import BrowserRoute, render_page
from app.api.image_errors import ERROR_SENTENCES_FOR_PAGES
from app.ledger.units import MAX_DIMENSION, MAX_QUALITY, MIN_QUALITY
from app.pipeline.options import avif_supported

router = APIRouter(include_in_schema=False, route_class=BrowserRoute)
request_pages = APIRouter(include_in_schema=False)


@router.get("/")
def upload_page(request: Request) -> Response:
    settings = request.app.state.settings
    return render_page(
        request,
        "upload.html",
        {
            "page": "upload",
            # The form offers what the API accepts, with the defaults it would use.
            "default_quality": settings.jpeg_quality,
            "default_progressive": settings.jpeg_progressive,
            "min_quality": MIN_QUALITY,
            "max_quality": MAX_QUALITY,
            "max_dimension": MAX_DIMENSION,
            "avif_supported": avif_supported(),
        },
    )


@router.get("/requests")
def requests_page(request: Request) -> Response:
    return render_page(request, "requests.html", {"page": "requests"})


@request_pages.get("/requests/{request_id}")
def request_page(request_id: str, request: Request) -> Response:
    """Served to anyone: the id is only echoed back to the script, which asks the API
    (with the key) whether the request exists and is the caller's."""
    return render_page(
        request,
        "request.html",
        {"page": "request", "request_id": request_id, "error_sentences": ERROR_SENTENCES_FOR_PAGES},
    )
