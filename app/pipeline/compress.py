"""Compress stage: decode untrusted bytes, normalise, encode as a JPEG at the set quality.

Limits come before work: the format is decided from the bytes (not the Content-Type or
extension), and the pixel count is checked from the header before any pixel is decoded.
The output keeps the dimensions (after EXIF orientation) and the ICC colour profile
where it still describes the output's colour space; all other metadata is dropped.
"""

import io
import os
import threading
import warnings
from dataclasses import dataclass

from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from app.pipeline.failures import CorruptImage, DecompressionBomb, NotAnImage

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
EXIF_ORIENTATION = 0x0112
WHITE = (255, 255, 255)
SMALL_IMAGE_PIXELS = 250_000
_thread_sink = threading.local()

# This stage enforces its own pixel cap (MAX_IMAGE_PIXELS) before decoding; Pillow's
# process-wide guard would otherwise refuse or warn at a different, fixed size.
Image.MAX_IMAGE_PIXELS = None

_SRGB_PROFILE = ImageCms.createProfile("sRGB")


@dataclass(frozen=True)
class CompressedImage:
    data: bytes
    width: int
    height: int
    source_format: str


def compress_to_jpeg(data: bytes | bytearray, *, quality: int, max_pixels: int) -> CompressedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        raise NotAnImage("the content is not an image in a supported format") from exc
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(str(exc)) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptImage(f"the image header cannot be read: {exc}") from exc

    # Decode in one call rather than in 64 KiB steps: each step re-takes the GIL, and with
    # download threads running that wait is what keeps threads from using both cores.
    image.decodermaxblock = max(image.decodermaxblock, len(data))
    source_format = image.format or "unknown"
    width, height = image.size
    if width <= 0 or height <= 0:
        raise CorruptImage("the image has no pixels")
    if width * height > max_pixels:
        raise DecompressionBomb(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        image.load()  # first frame of an animation
        orientation = image.getexif().get(EXIF_ORIENTATION)
        if orientation in range(2, 9):
            image = ImageOps.exif_transpose(image)
        image, icc_profile = _jpeg_compatible(image)
        output = _encode_jpeg(image, quality=quality, icc_profile=icc_profile, comment=b"")
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
    ) as exc:
        raise CorruptImage(f"the image cannot be decoded: {exc}") from exc
    return CompressedImage(output, image.width, image.height, source_format)


def _encode_jpeg(image: Image.Image, **params) -> bytes:
    """Encode into a file descriptor, not a BytesIO: Pillow releases the GIL while it
    encodes to a real file but holds it while encoding to a Python buffer, which would
    let only one thread encode at a time. An in-memory file (memfd) gives us both. Small
    images skip it: their encoding is quicker than the extra system calls."""
    if not hasattr(os, "memfd_create") or image.width * image.height < SMALL_IMAGE_PIXELS:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", **params)
        return buffer.getvalue()
    sink = getattr(_thread_sink, "file", None)
    if sink is None:  # one per thread, reused: creating a memfd costs more than using one
        sink = _thread_sink.file = os.fdopen(os.memfd_create("jpeg", os.MFD_CLOEXEC), "w+b")
    sink.seek(0)
    sink.truncate()
    image.save(sink, "JPEG", **params)
    size = sink.tell()
    sink.seek(0)
    return sink.read(size)


def _profile_colour_space(icc_profile: bytes | None) -> bytes | None:
    return icc_profile[16:20] if icc_profile and len(icc_profile) >= 20 else None


def _jpeg_compatible(image: Image.Image) -> tuple[Image.Image, bytes | None]:
    """Return an L or RGB image and the ICC profile that still describes it, if any."""
    icc_profile = image.info.get("icc_profile")
    mode = image.mode

    if mode == "CMYK":
        if _profile_colour_space(icc_profile) == b"CMYK":
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
                return ImageCms.profileToProfile(image, source, _SRGB_PROFILE, outputMode="RGB"), None
            except ImageCms.PyCMSError:
                pass
        return image.convert("RGB"), None

    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples: scale to 8 bits rather than clipping everything above 255.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
        return image, icc_profile if _profile_colour_space(icc_profile) == b"GRAY" else None
    if mode == "F":
        return image.convert("L"), None

    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        grey = mode in ("LA", "La", "L")
        with_alpha = "LA" if grey else "RGBA"
        if image.mode != with_alpha:
            image = image.convert(with_alpha)
        background = Image.new("L" if grey else "RGB", image.size, 255 if grey else WHITE)
        # The image is its own mask (Pillow uses its alpha band): no extra full-size copies.
        background.paste(image, mask=image)
        image = background
    elif mode == "1":
        image = image.convert("L")
    elif mode not in ("RGB", "L"):
        image = image.convert("RGB")

    expected = b"GRAY" if image.mode == "L" else b"RGB "
    return image, icc_profile if _profile_colour_space(icc_profile) == expected else None


def warm_up() -> bool:
    """Decode and encode a small image of each format once, so that the first batch does
    not pay for loading Pillow's format plugins and codec libraries. Run at start-up, in
    the service and in each compress worker process."""
    sample = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    for source_format in ("JPEG", "PNG", "WEBP", "GIF"):
        buffer = io.BytesIO()
        try:
            sample.save(buffer, source_format)
        except (OSError, KeyError):  # a Pillow built without this codec: nothing to warm
            continue
        compress_to_jpeg(buffer.getvalue(), quality=50, max_pixels=SMALL_IMAGE_PIXELS)
    return True
