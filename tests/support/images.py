"""Real image bytes of every kind the service must handle, made with Pillow."""

import functools
import io
import zlib

from PIL import Image, ImageCms, ImageDraw


def photo_like(size=(320, 240), mode="RGB") -> Image.Image:
    """A gradient with shapes: compresses like a photo rather than a flat colour."""
    width, height = size
    image = Image.linear_gradient("L").resize(size)
    rgb = Image.merge("RGB", (image, image.rotate(90).resize(size), Image.new("L", size, 128)))
    draw = ImageDraw.Draw(rgb)
    draw.ellipse((width // 4, height // 4, width // 2, height // 2), fill=(200, 30, 30))
    draw.rectangle(
        (width // 2, height // 2, max(width // 2, width - 10), max(height // 2, height - 10)),
        fill=(20, 160, 40),
    )
    return rgb.convert(mode) if mode != "RGB" else rgb


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def jpeg(size=(320, 240), **params) -> bytes:
    return encode(photo_like(size), "JPEG", quality=95, **params)


def png_rgba(size=(200, 100)) -> bytes:
    image = photo_like(size).convert("RGBA")
    alpha = Image.new("L", size, 0)
    ImageDraw.Draw(alpha).rectangle((0, 0, size[0] // 2, size[1]), fill=255)
    image.putalpha(alpha)  # right half fully transparent
    return encode(image, "PNG")


def cmyk_jpeg(size=(160, 120)) -> bytes:
    return encode(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG", quality=95)  # red


def palette_gif_transparent(size=(64, 48)) -> bytes:
    image = Image.new("P", size, 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2, size[1]), fill=1)
    return encode(image, "GIF", transparency=0)  # left half blue, right half transparent


def png_16bit_grey(size=(100, 80)) -> bytes:
    image = Image.frombytes("I;16", size, (40000).to_bytes(2, "little") * size[0] * size[1])
    return encode(image, "PNG")


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header (with a valid CRC) claims width x height pixels."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


def animated_gif(size=(60, 40)) -> bytes:
    frames = [Image.new("RGB", size, colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def exif_rotated_jpeg(size=(300, 100), orientation=6) -> bytes:
    image = photo_like(size)
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "CameraMaker"
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def jpeg_with_icc(size=(120, 90)) -> tuple[bytes, bytes]:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return encode(photo_like(size), "JPEG", quality=95, icc_profile=profile), profile


def webp(size=(150, 100)) -> bytes:
    return encode(photo_like(size), "WEBP", quality=90)


def bmp(size=(90, 70)) -> bytes:
    return encode(photo_like(size), "BMP")


def tiff(size=(90, 70)) -> bytes:
    return encode(photo_like(size), "TIFF")


def flat_png(width: int, height: int, mode: str = "RGBA", colour: bytes = b"\x0a\xc8\x1e\x80") -> bytes:
    """A single-colour PNG of any size, written row by row: a few hundred KB for 90 MP,
    without holding the pixels in memory."""
    colour_type, depth, pixel = {"RGBA": (6, 8, colour), "I;16": (0, 16, colour[:2])}[mode]
    row = b"\x00" + pixel * width
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, colour_type, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@functools.cache
def slow_to_decode() -> bytes:
    """A 36 MP greyscale PNG of 50 kB: a tenth of a second or more to decode and encode,
    long enough to catch a process in the act."""
    return encode(Image.linear_gradient("L").resize((6000, 6000)), "PNG")
