"""Thumbnails as the web process serves them: stored bytes, never a decode.

The image stage makes each output's thumbnail from the output's pixels, under the worker's
memory budget, and stores it beside the output (`{request_id}/thumbs/{image_id}.jpg`,
app/storage thumbnail_key), so deleting a request's outputs removes its thumbnails too.
Outputs stored before the stage made thumbnails have none: they get a placeholder
rather than a decode in the web process, where nothing bounds the memory it takes.
"""

from dataclasses import dataclass

from app.storage import JPEG_CONTENT_TYPE, ImageStorage, output_key, thumbnail_key

PLACEHOLDER_CONTENT_TYPE = "image/svg+xml"
PLACEHOLDER = (
    b'<svg xmlns="http://www.w3.org/2000/svg" width="240" height="240" viewBox="0 0 240 240">'
    b'<rect width="240" height="240" fill="#e8e8e8"/>'
    b'<text x="120" y="126" font-family="sans-serif" font-size="16" text-anchor="middle" '
    b'fill="#555">no preview</text></svg>'
)


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    content_type: str
    placeholder: bool = False  # the output has no stored thumbnail


def stored_thumbnail(storage: ImageStorage, request_id: str, image_id: int, extension: str) -> Thumbnail:
    """The stored thumbnail of an output, or the placeholder for an output stored without
    one; FileNotFoundError when neither the thumbnail nor the output exists. Raises
    StoreFailure when the storage cannot be read."""
    try:
        return Thumbnail(storage.open(thumbnail_key(request_id, image_id)), JPEG_CONTENT_TYPE)
    except FileNotFoundError:
        pass
    if not storage.exists(output_key(request_id, image_id, extension)):
        raise FileNotFoundError(f"no output {output_key(request_id, image_id, extension)}")
    return Thumbnail(PLACEHOLDER, PLACEHOLDER_CONTENT_TYPE, placeholder=True)
