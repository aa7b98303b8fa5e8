"""GET /thumbnails/{request_id}/{output file}: a small JPEG of an output (JPEG, WebP or
AVIF), public like the outputs themselves (an <img> cannot send an API key). Only stored
bytes are served: the image stage made the thumbnail (app/services/thumbnails.py)."""

import re
from typing import Annotated

from fastapi import APIRouter, Path, Response

from app.api.deps import StorageDep
from app.api.routes.problems import PROBLEM_RESPONSES
from app.errors import NotFound
from app.services.thumbnails import stored_thumbnail

router = APIRouter(tags=["outputs"])

_REQUEST_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_IMAGE_FILE = re.compile(r"([0-9]{1,18})\.(jpg|webp|avif)")
# Outputs never change under their key, so neither do their thumbnails.
THUMBNAIL_CACHE_CONTROL = "public, max-age=31536000, immutable"
# An output stored without a thumbnail keeps its placeholder, but nothing promises so.
PLACEHOLDER_CACHE_CONTROL = "public, max-age=3600"


@router.get(
    "/thumbnails/{request_id}/{image_file}",
    response_class=Response,
    responses={
        200: {
            "content": {"image/jpeg": {}, "image/svg+xml": {}},
            "description": "the thumbnail (an SVG placeholder for outputs stored without one)",
        },
        **PROBLEM_RESPONSES,
    },
    summary="A thumbnail of an output image (at most 240 px on its long side)",
)
def get_thumbnail(
    request_id: str,
    image_file: Annotated[str, Path(description="the output's file name: {image_id}.jpg, .webp or .avif")],
    storage: StorageDep,
) -> Response:
    image_name = _IMAGE_FILE.fullmatch(image_file)
    if not _REQUEST_ID.fullmatch(request_id) or image_name is None:
        raise NotFound("no such output image")
    try:
        thumbnail = stored_thumbnail(storage, request_id, int(image_name.group(1)), image_name.group(2))
    except FileNotFoundError:
        raise NotFound("no such output image") from None
    cache_control = PLACEHOLDER_CACHE_CONTROL if thumbnail.placeholder else THUMBNAIL_CACHE_CONTROL
    return Response(
        thumbnail.data, media_type=thumbnail.content_type, headers={"Cache-Control": cache_control}
    )
