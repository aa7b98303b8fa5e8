"""The compress stage on real image bytes of every kind."""

import io

import pytest
from PIL import Image

from app.pipeline.compress import Encoding, compress_image, compress_to_jpeg
from app.pipeline.failures import CorruptImage, DecompressionBomb, NotAnImage
from tests.support import images

# libjpeg's quality 50 uses the standard (ITU-T T.81 Annex K) tables unscaled.
STANDARD_LUMINANCE_TABLE = [
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
]  # fmt: skip


def compress(data: bytes, quality: int = 50, max_pixels: int = 10_000_000):
    result = compress_to_jpeg(data, quality=quality, max_pixels=max_pixels)
    return result, Image.open(io.BytesIO(result.data))


def test_output_is_a_quality_50_jpeg_with_unchanged_dimensions():
    result, out = compress(images.jpeg((320, 240)))
    assert out.format == "JPEG"
    assert out.size == (320, 240) == (result.width, result.height)
    assert list(out.quantization[0]) == STANDARD_LUMINANCE_TABLE


def test_quality_setting_changes_the_quantization_table():
    _, out = compress(images.jpeg(), quality=80)
    assert list(out.quantization[0]) != STANDARD_LUMINANCE_TABLE
    assert max(out.quantization[0]) < max(STANDARD_LUMINANCE_TABLE)


def test_exif_orientation_is_applied_and_exif_dropped():
    result, out = compress(images.exif_rotated_jpeg((300, 100), orientation=6))
    assert out.size == (100, 300)
    assert (result.width, result.height) == (100, 300)
    assert not out.getexif()
    assert "exif" not in out.info


def test_rgba_transparency_is_flattened_onto_white():
    _, out = compress(images.png_rgba((200, 100)))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((190, 50))  # transparent half
    assert min(r, g, b) > 245


@pytest.mark.parametrize(
    ("mode", "pixel", "expected"),
    [("RGBA", (200, 0, 0, 128), (227, 127, 127)), ("LA", (0, 128), (127,))],
)
def test_half_transparent_pixels_are_blended_with_white(mode, pixel, expected):
    buffer = io.BytesIO()
    Image.new(mode, (64, 64), pixel).save(buffer, "PNG")
    _, out = compress(buffer.getvalue(), quality=95)
    channels = out.getpixel((32, 32))
    channels = channels if isinstance(channels, tuple) else (channels,)
    assert all(abs(got - want) <= 2 for got, want in zip(channels, expected, strict=True))


def test_palette_with_transparency_is_flattened_onto_white():
    _, out = compress(images.palette_gif_transparent((64, 48)))
    assert out.mode == "RGB"
    assert min(out.getpixel((60, 24))) > 245  # transparent half is white
    r, g, b = out.getpixel((5, 24))
    assert b > 200 and r < 60 and g < 60  # opaque half stays blue


def test_cmyk_becomes_rgb_with_the_right_colour():
    _, out = compress(images.cmyk_jpeg())
    assert out.mode == "RGB"
    r, g, b = out.getpixel((80, 60))
    assert r > 200 and g < 60 and b < 60


def test_16_bit_greyscale_is_scaled_not_clipped():
    _, out = compress(images.png_16bit_grey())
    assert out.mode == "L"
    assert 145 < out.getpixel((50, 40)) < 170  # 40000 / 65535 * 255 ~ 156


def test_animation_keeps_its_first_frame():
    _, out = compress(images.animated_gif())
    r, g, b = out.convert("RGB").getpixel((30, 20))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("make", [images.webp, images.bmp, images.tiff])
def test_other_formats_are_converted(make):
    source = Image.open(io.BytesIO(make()))
    result, out = compress(make())
    assert out.format == "JPEG"
    assert out.size == source.size
    assert result.source_format == source.format


def test_with_color_profile_keep_the_icc_profile_is_kept_and_comments_dropped():
    data, profile = images.jpeg_with_icc()
    source = Image.open(io.BytesIO(data))
    source.info["comment"] = b"secret"
    result = compress_image(data, Encoding(50, color_profile="keep"), max_pixels=10_000_000)
    out = Image.open(io.BytesIO(result.data))
    assert out.info.get("icc_profile") == profile
    assert "comment" not in out.info
    # By default (COLOR_PROFILE=srgb) an sRGB profile is simply dropped.
    _, out = compress(data)
    assert "icc_profile" not in out.info


def test_pixel_cap_refuses_before_decoding():
    with pytest.raises(DecompressionBomb):
        compress(images.jpeg((400, 300)), max_pixels=400 * 300 - 1)


def test_huge_dimensions_in_header_are_refused():
    with pytest.raises(DecompressionBomb):
        compress(images.png_claiming_size(40000, 40000), max_pixels=100_000_000)


def test_html_is_not_an_image():
    with pytest.raises(NotAnImage):
        compress(b"<html><body>hello</body></html>")


def test_truncated_jpeg_is_corrupt():
    data = images.jpeg((640, 480))
    with pytest.raises(CorruptImage):
        compress(data[: len(data) // 2])


def test_formats_outside_the_allowlist_are_refused():
    with pytest.raises(NotAnImage):
        compress(images.encode(Image.new("RGB", (10, 10)), "PPM"))
