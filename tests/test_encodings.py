"""The compress stage's encodings: optimized and progressive JPEGs, WebP and AVIF, a
largest size, and keeping a smaller input. Real image bytes, no database."""

import io

import pytest
from PIL import Image

from app.pipeline.compress import Encoding, compress_image, fitted_size
from app.pipeline.options import avif_supported
from tests.support import images
from tests.test_compress import STANDARD_LUMINANCE_TABLE

MAX_PIXELS = 50_000_000


def encode(data: bytes, **encoding) -> tuple[bytes, Image.Image]:
    result = compress_image(data, Encoding(**{"quality": 50, **encoding}), max_pixels=MAX_PIXELS)
    return result.data, Image.open(io.BytesIO(result.data))


def test_optimized_huffman_tables_make_a_smaller_jpeg_of_the_same_pixels_and_quality():
    source = images.jpeg((800, 600))
    plain, plain_image = encode(source)
    optimized, optimized_image = encode(source, optimize=True)
    assert len(optimized) < len(plain)
    assert optimized_image.quantization == plain_image.quantization
    assert list(optimized_image.quantization[0]) == STANDARD_LUMINANCE_TABLE
    assert optimized_image.tobytes() == plain_image.tobytes()


def test_progressive_jpegs_are_progressive_at_the_same_quality():
    _, image = encode(images.jpeg((400, 300)), optimize=True, progressive=True)
    assert image.info.get("progressive") and list(image.quantization[0]) == STANDARD_LUMINANCE_TABLE
    _, baseline = encode(images.jpeg((400, 300)), optimize=True)
    assert "progressive" not in baseline.info


def test_the_output_fits_inside_the_box_keeping_its_aspect_and_is_never_enlarged():
    _, image = encode(images.jpeg((2400, 1800)), max_size=(1000, 1000))
    assert image.size == (1000, 750)
    _, small = encode(images.jpeg((300, 200)), max_size=(1000, 1000))
    assert small.size == (300, 200)
    _, tall = encode(images.jpeg((300, 200)), max_size=(20_000, 100))
    assert tall.size == (150, 100)
    assert fitted_size(2400, 1800, None) == (2400, 1800)


def test_the_box_applies_to_the_image_as_shown_after_exif_rotation():
    # Stored 300x100 with orientation 6: shown 100x300, fitted into 1000x150 -> 50x150.
    result = compress_image(
        images.exif_rotated_jpeg((300, 100), orientation=6),
        Encoding(50, max_size=(1000, 150)),
        max_pixels=MAX_PIXELS,
    )
    assert (result.width, result.height) == (50, 150)
    assert Image.open(io.BytesIO(result.data)).size == (50, 150)


def test_webp_output():
    data, image = encode(images.png_rgba(), output_format="WEBP")
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP" and image.format == "WEBP"


@pytest.mark.skipif(not avif_supported(), reason="this Pillow cannot write AVIF")
def test_avif_output():
    data, image = encode(images.jpeg(), output_format="AVIF")
    assert data[4:12] in (b"ftypavif", b"ftypavis") and image.format == "AVIF"


def test_keep_smaller_keeps_an_already_small_jpeg_as_it_is():
    small = images.encode(images.photo_like((320, 240)), "JPEG", quality=20)
    kept = compress_image(small, Encoding(90, keep_smaller=True), max_pixels=MAX_PIXELS)
    assert kept.kept_original and kept.data == small
    re_encoded = compress_image(small, Encoding(90), max_pixels=MAX_PIXELS)
    assert not re_encoded.kept_original and len(re_encoded.data) > len(small)


def test_keep_smaller_re_encodes_when_the_format_or_size_changes():
    small = images.encode(images.photo_like((320, 240)), "JPEG", quality=20)
    as_webp = compress_image(
        small, Encoding(95, output_format="WEBP", keep_smaller=True), max_pixels=MAX_PIXELS
    )
    assert not as_webp.kept_original and as_webp.data[8:12] == b"WEBP"
    resized = compress_image(
        small, Encoding(95, max_size=(100, 100), keep_smaller=True), max_pixels=MAX_PIXELS
    )
    assert not resized.kept_original and (resized.width, resized.height) == (100, 75)
