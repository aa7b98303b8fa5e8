"""GET /processed_images/{key}: the outputs, wherever they are stored.

Local files are served from MEDIA_ROOT; with S3 storage the same URL answers 302 to a
presigned URL, so links in result CSVs keep working whichever backend wrote them."""

import re

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from app.config import Settings
from app.errors import NotFound
from app.storage import ImageStorage

MEDIA_PATH = "/processed_images"
# Keys are "{request_id}/{image_id}.{extension}"; nothing else is ever stored.
_OUTPUT_KEY = re.compile(r"[0-9a-f-]{36}/[0-9]+\.[a-z]{3,4}")


class ProcessedImages(StaticFiles):
    """Output files; hidden entries (the local store's .incoming folder of partial files)
    are never served."""

    def lookup_path(self, path: str):
        if any(part.startswith(".") for part in path.replace("\\", "/").split("/")):
            return "", None
        return super().lookup_path(path)


def mount_processed_images(app: FastAPI, settings: Settings, storage: ImageStorage) -> None:
    if settings.storage_backend == "local":
        app.mount(
            MEDIA_PATH,
            ProcessedImages(directory=settings.media_root, check_dir=False),
            name="processed_images",
        )
        return
    router = APIRouter(tags=["outputs"])

    @router.get(
        MEDIA_PATH + "/{key:path}",
        status_code=302,
        response_class=RedirectResponse,
        summary="An output image: a redirect to a presigned URL of its object",
    )
    def presigned_output(key: str) -> RedirectResponse:
        if not _OUTPUT_KEY.fullmatch(key):
            raise NotFound("no such output image")
        return RedirectResponse(storage.presigned_url(key), status_code=302)

    app.include_router(router)
