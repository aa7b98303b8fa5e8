"""Compress stage: decode untrusted bytes, normalise, encode as a JPEG (or the WebP or
AVIF a batch asks for, app/pipeline/options.py) at the set quality, fitted inside the
batch's largest size if it has one.

Inputs: JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF (Pillow's plugin, libavif) and HEIC/HEIF
(pillow-heif, libheif). Of an animation (GIF, APNG, animated WebP or AVIF) or a HEIF
holding several images, the first frame or the primary image is the output; the pixel
limit counts the canvas that is decoded for it.

Limits come before work: the format is decided from the bytes (not the Content-Type or
extension), and the pixel count is checked from the header (for HEIF and AVIF, from
every size the file declares) before any pixel is decoded. Outputs are upright (EXIF
orientation applied; HEIF and AVIF transforms too), L or RGB, in sRGB without a profile
unless COLOR_PROFILE=keep (app/pipeline/colour.py), and carry only the metadata METADATA
allows (app/pipeline/metadata.py).

The memory the work will take at its peak is estimated from the header too
(`peak_memory_bytes`), so the caller can admit the decode against a memory budget.
"""

import io
import os
import threading
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import pillow_heif
from PIL import AvifImagePlugin, Image, UnidentifiedImageError

from app.pipeline import colour
from app.pipeline.failures import CorruptImage, DecompressionBomb, NotAnImage
from app.pipeline.formats import isobmff_declared_pixels, sniffed_format
from app.pipeline.metadata import NotStrippable, published_exif, strip_original

# One thread per decode, as for the AVIF encoder below: COMPRESS_CONCURRENCY decides how
# many decodes share the cores, and the memory estimate is per thread. HEIF files also
# carry thumbnails, depth maps and other auxiliary images: never decoded.
AvifImagePlugin.DEFAULT_MAX_THREADS = 1
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False, decode_threads=1)

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "HEIF")
# The formats a kept original may be in: those whose metadata metadata.py can remove.
STRIPPABLE_FORMATS = ("JPEG", "WEBP")
EXIF_ORIENTATION = 0x0112
TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
WHITE = (255, 255, 255)
SMALL_IMAGE_PIXELS = 250_000
_thread_sink = threading.local()

# This stage enforces its own pixel cap (MAX_IMAGE_PIXELS) before decoding; Pillow's
# process-wide guard would otherwise refuse or warn at a different, fixed size.
Image.MAX_IMAGE_PIXELS = None


@dataclass(frozen=True)
class CompressedImage:
    data: bytes
    width: int
    height: int
    source_format: str
    # keep_smaller: the input, its metadata removed, was smaller, so it is the output.
    kept_original: bool = False
    # A small JPEG of the output (make_thumbnail), made from its pixels before they go.
    thumbnail: bytes | None = None


@dataclass(frozen=True)
class Encoding:
    """How to encode: Pillow's format name and quality; for JPEG, optimized Huffman tables
    (lossless: same pixels, same quantisation tables, smaller file) and progressive
    scans; a box the output must fit in; whether a smaller input of the same format
    is kept instead; which metadata is published (METADATA) and whether colours are
    converted to sRGB or the profile kept (COLOR_PROFILE)."""

    quality: int
    output_format: str = "JPEG"
    optimize: bool = False
    progressive: bool = False
    max_size: tuple[int, int] | None = None
    keep_smaller: bool = False
    metadata: str = "copyright"
    color_profile: str = "srgb"

    def save_params(self) -> dict:
        if self.output_format == "JPEG":
            params = {"quality": self.quality, "comment": b""}
            if self.optimize:
                params["optimize"] = True
            if self.progressive:
                params["progressive"] = True
            return params
        if self.output_format == "AVIF":
            # libavif starts a thread per core by default: COMPRESS_CONCURRENCY already
            # decides how many encodes share the cores, and the memory estimate is per thread.
            return {"quality": self.quality, "max_threads": 1}
        return {"quality": self.quality}


def fitted_size(width: int, height: int, box: tuple[int, int] | None) -> tuple[int, int]:
    """The size inside box keeping the aspect ratio, never larger than the image."""
    if box is None or (width <= box[0] and height <= box[1]):
        return width, height
    scale = min(box[0] / width, box[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


Admission = Callable[[int], AbstractContextManager[object]]


def compress_to_jpeg(
    data: bytes | bytearray, *, quality: int, max_pixels: int, admission: Admission | None = None
) -> CompressedImage:
    """A baseline JPEG with Pillow's default Huffman tables (see compress_image)."""
    return compress_image(data, Encoding(quality), max_pixels=max_pixels, admission=admission)


def compress_image(
    data: bytes | bytearray,
    encoding: Encoding,
    *,
    max_pixels: int,
    admission: Admission | None = None,
    thumbnail_side: int = 0,
) -> CompressedImage:
    """Decode, normalise and encode one image. `admission(cost_bytes)`, if given, is entered
    with the estimated peak memory once the header is read, and held while pixels exist:
    it may wait for memory, or refuse the image by raising an ImageFailure. With a
    thumbnail_side, the result carries a JPEG thumbnail of the output that fits in it."""
    quality = encoding.quality
    claimed_format = sniffed_format(data)
    if claimed_format in ("HEIF", "AVIF"):
        declared = isobmff_declared_pixels(data)
        if declared is not None and declared[0] * declared[1] > max_pixels:
            raise DecompressionBomb(
                f"the {claimed_format} file declares an image of {declared[0]}x{declared[1]} = "
                f"{declared[0] * declared[1]} pixels; the limit is {max_pixels}"
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError as exc:
        if claimed_format is not None:
            # The signature of a supported format, but no decoder could read the header.
            raise CorruptImage(f"the {claimed_format} image is truncated or damaged") from exc
        raise NotAnImage("the content is not an image in a supported format") from exc
    except Image.DecompressionBombError as exc:
        raise DecompressionBomb(str(exc)) from exc
    except (OSError, ValueError, SyntaxError, RuntimeError) as exc:
        raise CorruptImage(f"the image header cannot be read: {exc}") from exc

    # Decode in one call rather than in 64 KiB steps: each step re-takes the GIL, and with
    # download threads running that wait is what keeps threads from using both cores.
    image.decodermaxblock = max(image.decodermaxblock, len(data))
    source_format = image.format or "unknown"
    width, height = image_size = image.size
    if width <= 0 or height <= 0:
        raise CorruptImage("the image has no pixels")
    if width * height > max_pixels:
        raise DecompressionBomb(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    try:
        orientation = _header_orientation(image)
        exif = published_exif(_header_exif(image), encoding.metadata)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CorruptImage(f"the image metadata cannot be read: {exc}") from exc
    source_icc = image.info.get("icc_profile")
    keep_icc = encoding.color_profile == "keep"
    # What a kept original must already be: its output's format, L or RGB without
    # transparency, one frame, upright, in sRGB unless profiles are kept, and at its size.
    may_keep = (
        encoding.keep_smaller
        and source_format == encoding.output_format
        and source_format in STRIPPABLE_FORMATS
        and image.mode in ("RGB", "L")
        and "transparency" not in image.info
        and getattr(image, "n_frames", 1) == 1
        and orientation in (None, 1)
        and (keep_icc or not source_icc or colour.is_srgb(source_icc))
    )
    # The box in the stored (not yet rotated) orientation: resizing comes before the
    # transpose, so the transpose copies the smaller image.
    box = encoding.max_size
    if box is not None and orientation in (5, 6, 7, 8):
        box = (box[1], box[0])
    resized = fitted_size(width, height, box)
    cost = peak_memory_bytes(
        image,
        orientation=orientation,
        input_bytes=len(data),
        quality=quality,
        resized=resized != (width, height),
        output_format=encoding.output_format,
        whole_image_jpeg=encoding.optimize or encoding.progressive,
        thumbnail=thumbnail_side > 0,
    )
    with admission(cost) if admission is not None else nullcontext():
        try:
            image.load()  # first frame of an animation
            image, icc_profile = _jpeg_compatible(image, keep_icc=keep_icc)
            if resized != image.size:
                image = image.resize(resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
            # Transposed after the conversion, which leaves at most as many bytes a pixel
            # (e.g. 16-bit or alpha images): a smaller copy, and the source is gone by then.
            if orientation in TRANSPOSE_FOR_ORIENTATION:
                image = image.transpose(TRANSPOSE_FOR_ORIENTATION[orientation])
            width, height = image.size
            params = encoding.save_params()
            # Explicitly empty when dropped: the AVIF encoder falls back to the profile in
            # image.info, which may describe the source's colour space, not the output's.
            params["icc_profile"] = icc_profile or b""
            params["exif"] = exif
            if encoding.output_format != "JPEG":
                params["xmp"] = b""
            encoded = _encode(image, encoding.output_format, **params)
            # An output that fits the thumbnail's box as a JPEG with no profile is its own
            # thumbnail: a second encode of the same pixels would only change the quality.
            output_is_thumbnail = (
                thumbnail_side > 0
                and encoding.output_format == "JPEG"
                and not params["icc_profile"]
                and max(width, height) <= thumbnail_side
            )
            thumbnail = None
            if thumbnail_side > 0 and not output_is_thumbnail:
                thumbnail = make_thumbnail(image, thumbnail_side)
            del image  # the pixels go before the output is copied out, so it can reuse them
            output = encoded()
            if output_is_thumbnail:
                thumbnail = output
        except (
            OSError,
            ValueError,
            SyntaxError,
            EOFError,
            Image.DecompressionBombError,
        ) as exc:
            raise CorruptImage(f"the image cannot be decoded: {exc}") from exc
    if may_keep and resized == image_size:
        try:
            original = strip_original(data, source_format, exif, keep_icc=keep_icc, size=image_size)
        except NotStrippable:
            original = None
        if original is not None and len(original) <= len(output):
            return CompressedImage(
                original, width, height, source_format, kept_original=True, thumbnail=thumbnail
            )
    return CompressedImage(output, width, height, source_format, thumbnail=thumbnail)


THUMBNAIL_QUALITY = 75


def make_thumbnail(image: Image.Image, long_side: int) -> bytes:
    """A JPEG of an L or RGB image at most long_side pixels on its long side (the image's
    own size when smaller)."""
    size = fitted_size(image.width, image.height, (long_side, long_side))
    # reducing_gap: a box reduction first, so a large image costs at most a quarter-size
    # copy (peak_memory_bytes counts it) and a few milliseconds.
    small = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=2.0) if size != image.size else image
    buffer = io.BytesIO()
    small.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True, icc_profile=b"", comment=b"")
    return buffer.getvalue()


def _header_orientation(image: Image.Image) -> int | None:
    """The EXIF orientation, read without decoding any pixel. A PNG's eXIf chunk counts
    only before the image data, as the PNG specification places it: Pillow would decode
    the whole image to look for one after it, and the memory estimate comes first."""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    return image.getexif().get(EXIF_ORIENTATION)


def _header_exif(image: Image.Image) -> Image.Exif | None:
    """The EXIF the header holds (None for a PNG whose eXIf chunk, if any, comes after
    the image data: see _header_orientation)."""
    if image.format == "PNG" and "exif" not in image.info:
        return None
    return image.getexif()


def _encode(image: Image.Image, output_format: str, **params) -> Callable[[], bytes]:
    """Encode into a file descriptor, not a BytesIO: Pillow releases the GIL while it
    encodes to a real file but holds it while encoding to a Python buffer, which would
    let only one thread encode at a time. An in-memory file (memfd) gives us both. Small
    images skip it: their encoding is quicker than the extra system calls.

    Returns a function that reads the JPEG out, so that the caller can drop the image
    first."""
    if not hasattr(os, "memfd_create") or image.width * image.height < SMALL_IMAGE_PIXELS:
        buffer = io.BytesIO()
        image.save(buffer, output_format, **params)
        return buffer.getvalue
    sink = getattr(_thread_sink, "file", None)
    if sink is None:  # one per thread, reused: creating a memfd costs more than using one
        sink = _thread_sink.file = os.fdopen(os.memfd_create("jpeg", os.MFD_CLOEXEC), "w+b")
    sink.seek(0)
    sink.truncate()
    image.save(sink, output_format, **params)

    def read_out() -> bytes:
        size = sink.tell()
        sink.seek(0)
        output = sink.read(size)
        sink.truncate(0)  # a thread's last JPEG would otherwise stay in memory until its next
        return output

    return read_out


def _jpeg_compatible(image: Image.Image, *, keep_icc: bool = False) -> tuple[Image.Image, bytes | None]:
    """Return an L or RGB image and the ICC profile that still describes it, if any: with
    keep_icc the source's, when it matches; otherwise none, the pixels converted to sRGB."""
    icc_profile = image.info.get("icc_profile")
    image, icc_profile = _l_or_rgb(image, icc_profile)
    if keep_icc:
        return image, icc_profile
    if image.mode == "RGB":
        # In place: the conversion allocates nothing per pixel.
        image = colour.rgb_to_srgb(image, icc_profile)
    # A grey profile is dropped as it is: greys differ from sRGB's by a gamma curve at most.
    return image, None


def _l_or_rgb(image: Image.Image, icc_profile: bytes | None) -> tuple[Image.Image, bytes | None]:
    mode = image.mode
    if mode == "CMYK":
        return colour.cmyk_to_srgb(image, icc_profile), None

    if mode in SIXTEEN_BIT_MODES or mode == "I":
        # 16-bit samples: scale to 8 bits rather than clipping everything above 255.
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
        return image, icc_profile if colour.profile_colour_space(icc_profile) == b"GRAY" else None
    if mode == "F":
        return image.convert("L"), None

    if _has_alpha(image):
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
    return image, icc_profile if colour.profile_colour_space(icc_profile) == expected else None


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


# -- memory: keep the estimate in step with _jpeg_compatible above --------------------
#
# An upper bound of the bytes compressing an image takes at its peak, from the header.
# Measured (VmHWM delta in a fresh process, 12 MP images, worker allocator settings) and
# estimated, in bytes a pixel, flat images at quality 50 (the estimate adds 0.83 for the
# JPEG output and the input's size): JPEG RGB 4.0 (est. 4.8), EXIF-rotated 8.0 (8.8),
# progressive 4:4:4 10.0 (10.8), CMYK without a profile 11.3 (12.8), PNG RGBA 8.0 (8.8),
# palette with transparency 9.0 (9.8), 16-bit grey 10.0 (10.8), LA 6.0 (6.8), WebP 16.0 (16.8),
# EXIF-rotated WebP 17.2 (20.8), TIFF 32-bit int 12.0 (16.8, the input is 4 of them),
# HEIC 9.0 (10.8), HEIC rotated by its irot 10.5 (10.8), HEIC RGBA 11.0 (13.9), AVIF
# 12.2 (14.8), AVIF 4:4:4 13.7 (14.8), AVIF rotated 12.2 (14.8).
# tests/test_memory.py checks the bound per mode.


def _stored_bytes_per_pixel(mode: str) -> int:
    """What Pillow allocates a pixel: one byte for 1, L and P, two for 16-bit integers,
    four for every other mode (RGB is stored as four bytes too)."""
    if mode in ("1", "L", "P"):
        return 1
    return 2 if mode in SIXTEEN_BIT_MODES else 4


def _decoder_bytes_per_pixel(image: Image.Image) -> tuple[float, float]:
    """Bytes a pixel the decoder holds beyond the image: while decoding, and afterwards
    for as long as the image lives."""
    if image.format == "WEBP":
        # Pillow decodes WebP with libwebp's animation decoder: two RGBA canvases that live
        # as long as the image, and a copy of the frame while it is decoded.
        return 12, 8
    if image.format == "HEIF":
        # libheif's YCbCr planes (a second set when it applies the file's rotation) and
        # the interleaved RGB(A) pillow-heif copies from, which it may hold until closed.
        return (9, 4) if image.mode == "RGBA" else (6, 3)
    if image.format == "AVIF":
        # libavif's YCbCr planes, which the decoder keeps as long as the image lives (two
        # bytes a sample above 8 bits), dav1d's frame buffers and the RGBA it converts to.
        return 10, 6
    if image.format == "JPEG" and "progressive" in image.info:
        # libjpeg keeps every DCT coefficient (two bytes) until the last scan.
        sampling = [(h, v) for _id, h, v, _table in getattr(image, "layer", [])] or [(1, 1)] * 4
        full = max(h for h, _ in sampling) * max(v for _, v in sampling)
        return 2 * sum(h * v for h, v in sampling) / full, 0
    return 0, 0


def _conversion_bytes_per_pixel(image: Image.Image) -> tuple[int, int]:
    """Bytes a pixel _jpeg_compatible allocates while the source image is still alive,
    and the bytes a pixel of the image it returns."""
    mode = image.mode
    if mode == "CMYK":
        # Without a profile, Pillow's RGB and then the press table's (app/pipeline/colour.py).
        return 4 + 4, 4
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        return 4 + 4, 1  # convert("I") and point(); the final L comes after the first goes
    if mode == "F":
        return 1, 1
    if _has_alpha(image):
        grey = mode in ("LA", "La", "L")
        converted = 0 if mode == ("LA" if grey else "RGBA") else 4
        # paste() converts an LA source to L first: one more byte a pixel.
        return (converted + 1 + 1, 1) if grey else (converted + 4, 4)
    if mode == "1":
        return 1, 1
    if mode not in ("RGB", "L"):
        return 4, 4
    if image.format == "HEIF" and image.info.get("icc_profile"):
        return 4, 4  # its pixels are read-only: converted to sRGB into a copy (colour.py)
    return 0, _stored_bytes_per_pixel(mode)


def jpeg_bytes_bound(pixels: int, quality: int) -> int:
    """Most bytes a JPEG of this many pixels takes: random noise, the worst case, measured
    0.51 bytes a pixel at quality 50 and 1.33 at 95; this gives 0.83 and 1.43."""
    return pixels * (quality + 12) // 75


# Beyond the image, what each encoder holds a pixel at its peak (YUV planes, analysis and
# token buffers; baseline libjpeg works in strips and holds nothing). Measured as the
# figures above, less the image, input and output, photo-like and noise sources, 4 and
# 12 MP, quality 10 to 100 (tests/test_encoder_memory.py checks the bound per format):
#   JPEG optimized or progressive: 3.0 up to quality 90, 3.5 at 100 (every DCT
#     coefficient, two bytes, of Y at full and Cb, Cr at quarter resolution, kept for the
#     second pass)
#   WebP: 9.8 at quality 10, 14.2 at 50, 16.3 at 75, 21.4 at 90, 28.5 at 100 (noise;
#     photo-like images take less), hence 11 + quality^2 / 500
#   AVIF, one thread: 23.8 at quality 10, 24.7 at 50, 25.7 at 90, 27.2 at 100; its output
#     may exceed the JPEG bound by a little (1.53 bytes a pixel at 100): 29 covers both
JPEG_WHOLE_IMAGE_BYTES_PER_PIXEL = 4
AVIF_BYTES_PER_PIXEL = 29


def encoder_bytes_per_pixel(output_format: str, quality: int, *, whole_image_jpeg: bool = False) -> float:
    """What the encoder holds a pixel beyond the image; `whole_image_jpeg`: an optimized or
    progressive JPEG, which libjpeg encodes in two passes over every coefficient."""
    if output_format == "WEBP":
        return 11 + quality * quality / 500
    if output_format == "AVIF":
        return AVIF_BYTES_PER_PIXEL
    return JPEG_WHOLE_IMAGE_BYTES_PER_PIXEL if whole_image_jpeg else 0


def peak_memory_bytes(
    image: Image.Image,
    *,
    orientation: int | None,
    input_bytes: int,
    quality: int,
    resized: bool = False,
    output_format: str = "JPEG",
    whole_image_jpeg: bool = False,
    thumbnail: bool = False,
) -> int:
    """Upper bound of the memory compress_image takes at its peak for this opened (not
    yet decoded) image, beyond the input itself: a copy some decoders read it into, the decoded
    image and the decoder's buffers, each conversion's output while its input lives, the
    resized and transposed copies, the encoder's buffers or the thumbnail's copy, and the
    output."""
    pixels = image.width * image.height
    decoded = _stored_bytes_per_pixel(image.mode)
    decoding, decoder_kept = _decoder_bytes_per_pixel(image)
    converting, final = _conversion_bytes_per_pixel(image)
    per_pixel = max(decoded + decoding, decoded + decoder_kept + converting)
    if orientation in TRANSPOSE_FOR_ORIENTATION or resized:
        # A resized copy is at most as large as its source, made the same way.
        # Without a conversion the source is still alive when copied, and with one heap
        # arena the copy may not fit where the decoder's freed buffers were (measured:
        # a rotated WebP 17.2 bytes a pixel, not 16).
        # libavif's and libheif's own buffers are gone by then (measured: a rotated AVIF
        # 12.2 bytes a pixel, as an upright one).
        held = decoder_kept if image.format in ("AVIF", "HEIF") else decoding
        source = decoded + held if converting == 0 else final
        per_pixel = max(per_pixel, source + final)
    # The thumbnail is made once the encoder's buffers are gone, from the final image: a
    # box-reduced copy of at most a quarter of its pixels.
    encoder = encoder_bytes_per_pixel(output_format, quality, whole_image_jpeg=whole_image_jpeg)
    per_pixel += max(encoder, final / 4 if thumbnail else 0)
    return round(per_pixel * pixels) + input_bytes + jpeg_bytes_bound(pixels, quality)


def warm_up() -> bool:
    """Decode and encode a small image of each format once, so that the first batch does
    not pay for loading Pillow's format plugins and codec libraries. Run at start-up, in
    the service and in each compress worker process."""
    sample = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    for source_format in ("JPEG", "PNG", "WEBP", "GIF", "AVIF", "HEIF"):
        buffer = io.BytesIO()
        try:
            sample.save(buffer, source_format)
        except (OSError, KeyError):  # a Pillow built without this codec: nothing to warm
            continue
        compress_to_jpeg(buffer.getvalue(), quality=50, max_pixels=SMALL_IMAGE_PIXELS)
    buffer = io.BytesIO()
    sample.convert("CMYK").save(buffer, "JPEG")  # builds the press table once
    compress_to_jpeg(buffer.getvalue(), quality=50, max_pixels=SMALL_IMAGE_PIXELS)
    return True
