"""Small JPEGs of the outputs, for pages that show hundreds of them at once.

Made from the stored output on first request and kept in the same storage under the
request's prefix (`{request_id}/thumbs/{image_id}.jpg`), so deleting a request's outputs
removes its thumbnails too.
"""

import io
import logging

from PIL import Image

from app.storage import ImageStorage, StoreFailure, output_key

log = logging.getLogger(__name__)

THUMBNAIL_LONG_SIDE = 240
THUMBNAIL_QUALITY = 75


def thumbnail_key(request_id: str, image_id: int) -> str:
    return f"{request_id}/thumbs/{image_id}.jpg"


def make_thumbnail(output: bytes, long_side: int = THUMBNAIL_LONG_SIDE) -> bytes:
    """A JPEG at most long_side pixels on its long side; the output's own when smaller."""
    with Image.open(io.BytesIO(output)) as image:
        # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT, so a
        # large output costs a fraction of a full decode.
        image.draft("RGB", (long_side, long_side))
        image.thumbnail((long_side, long_side))
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
        return buffer.getvalue()


def output_thumbnail(storage: ImageStorage, request_id: str, image_id: int, extension: str = "jpg") -> bytes:
    """The thumbnail of an output, made and stored the first time it is asked for;
    FileNotFoundError when the output does not exist."""
    key = thumbnail_key(request_id, image_id)
    try:
        return storage.open(key)
    except FileNotFoundError:
        pass
    thumbnail = make_thumbnail(storage.open(output_key(request_id, image_id, extension)))
    try:
        storage.save(key, thumbnail)
    except StoreFailure as exc:
        # The thumbnail is still good to send; it is made again next time.
        log.warning("could not keep the thumbnail %s: %s", key, exc)
    return thumbnail
