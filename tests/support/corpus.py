"""A corpus of the images catalogues receive, made here with Pillow and pillow-heif:
phone photos (HEIC, JPEG) stored sideways with EXIF orientation, GPS, a serial number,
a maker note and XMP; AVIF; CMYK; wide-gamut RGB with real ICC profiles; animations;
16-bit; palette with transparency.

Every picture has a known upright look (`UPRIGHT`, asymmetric: a red disc top left, a
green bar at the bottom), so a test can compare what the service made with what a
person should see, whatever the file says about rotation.
"""

import io
import itertools
import struct
from dataclasses import dataclass
from pathlib import Path

import pillow_heif
from PIL import ExifTags, Image, ImageDraw

from tests.support.icc import cmyk_profile
from tests.support.images import encode

COPYRIGHT = "(c) 2026 Example Shop"
ARTIST = "A. Photographer"
SERIAL = "SN-4711-SECRET"
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="SecretTool XMP"/>'
    b"</rdf:RDF></x:xmpmeta>"
)
# Leaks a test looks for in the output bytes (as text anywhere in the file).
LEAKS = (SERIAL.encode(), b"SecretTool", b"MakerNoteSecret", b"Phone Model X")

# Real ICC profiles from Debian's colord-data and icc-profiles-free (.ci/run installs them).
PROFILE_DIRS = (Path("/usr/share/color/icc/colord"), Path("/usr/share/color/icc"))


# A CMYK press profile (tests/support/icc.py): paper white, each solid ink, overprints.
PRESS = cmyk_profile(
    {
        bits: (
            max(100 - 30 * sum(bits[:3]) - 84 * bits[3], 10),
            20 * (bits[1] - bits[0]),
            30 * (bits[2] - bits[0]),
        )
        for bits in itertools.product((0, 1), repeat=4)
    },
    "Corpus press",
)


def profile_bytes(name: str) -> bytes | None:
    for folder in PROFILE_DIRS:
        path = folder / name
        if path.is_file():
            return path.read_bytes()
    return None


def upright(size=(300, 600)) -> Image.Image:
    """The picture as a person should see it: portrait, a red disc top left, a green bar
    along the bottom, a blue-to-white gradient behind."""
    width, height = size
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    image = Image.merge("RGB", (image.getchannel(0), image.getchannel(0), Image.new("L", size, 230)))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, width // 2, width // 2), fill=(220, 20, 20))
    draw.rectangle((0, height - height // 6, width, height), fill=(20, 160, 40))
    return image


def phone_exif(orientation: int | None = 6) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "PhoneMaker"
    exif[ExifTags.Base.Model] = "Phone Model X"
    exif[ExifTags.Base.Copyright] = COPYRIGHT
    exif[ExifTags.Base.Artist] = ARTIST
    private = exif.get_ifd(ExifTags.IFD.Exif)
    private[ExifTags.Base.BodySerialNumber] = SERIAL
    private[ExifTags.Base.MakerNote] = b"MakerNoteSecret" * 4
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 36.0)
    return exif


def stored_for(orientation: int, picture: Image.Image) -> Image.Image:
    """The pixels a camera stores so that `orientation` shows `picture`."""
    inverse = {
        1: None,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    return picture.transpose(inverse) if inverse is not None else picture


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    upright: Image.Image | None  # what a person should see, when the sample is a picture
    copyright: bool = False  # carries the Copyright and Artist fields
    note: str = ""


def _with_com(jpeg: bytes, comment: bytes) -> bytes:
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]


def phone_jpeg(orientation: int = 6, quality: int = 90) -> bytes:
    picture = upright()
    data = encode(
        stored_for(orientation, picture),
        "JPEG",
        quality=quality,
        optimize=True,
        exif=phone_exif(orientation),
        xmp=XMP,
    )
    return _with_com(data, b"comment: Phone Model X")


def phone_heic(orientation: int = 6) -> bytes:
    # Given as bytes, pillow-heif writes the EXIF orientation as the HEIF transform (irot)
    # too, as phones do; readers follow the transform.
    # Written with pillow-heif's own API, not as a Pillow plugin: the service registers
    # the plugin itself, and a test must not do it in its place.
    buffer = io.BytesIO()
    heif = pillow_heif.from_pillow(stored_for(orientation, upright()))
    heif.save(buffer, quality=80, exif=phone_exif(orientation).tobytes(), xmp=XMP)
    return buffer.getvalue()


def phone_avif(orientation: int = 6) -> bytes:
    return encode(
        stored_for(orientation, upright()), "AVIF", quality=80, exif=phone_exif(orientation), xmp=XMP
    )


def phone_webp(orientation: int = 6, quality: int = 90) -> bytes:
    return encode(
        stored_for(orientation, upright()), "WEBP", quality=quality, exif=phone_exif(orientation), xmp=XMP
    )


def animation(fmt: str, size=(60, 40)) -> bytes:
    """Three frames, red, green, blue: the first frame (red) is the output."""
    frames = [Image.new("RGB", size, colour) for colour in ((230, 20, 20), (20, 230, 20), (20, 20, 230))]
    params = {"save_all": True, "append_images": frames[1:], "duration": 100, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    return encode(frames[0], fmt, **params)


def corpus() -> list[Sample]:
    """The samples every output option is run over."""
    picture = upright()
    samples = [
        Sample("phone.heic", phone_heic(), picture, copyright=True),
        Sample("phone.jpg", phone_jpeg(), picture, copyright=True),
        # Upright and already small: the originals keep_smaller may keep.
        Sample("phone-upright.jpg", phone_jpeg(orientation=1, quality=10), picture, copyright=True),
        Sample("phone.avif", phone_avif(), picture, copyright=True),
        Sample("phone.webp", phone_webp(), picture, copyright=True),
        Sample("phone-upright.webp", phone_webp(orientation=1, quality=10), picture, copyright=True),
        Sample("cmyk.jpg", encode(picture.convert("CMYK"), "JPEG", quality=95), None),
        Sample(
            "cmyk-profiled.jpg", encode(picture.convert("CMYK"), "JPEG", quality=95, icc_profile=PRESS), None
        ),
        Sample("animated.gif", animation("GIF"), Image.new("RGB", (60, 40), (230, 20, 20))),
        Sample("animated.webp", animation("WEBP"), Image.new("RGB", (60, 40), (230, 20, 20))),
        Sample("animated.png", animation("PNG"), Image.new("RGB", (60, 40), (230, 20, 20))),
        Sample("animated.avif", animation("AVIF"), Image.new("RGB", (60, 40), (230, 20, 20))),
        Sample(
            "grey-16-bit.png",
            encode(Image.new("I;16", (80, 60), 40000), "PNG"),
            Image.new("L", (80, 60), 40000 // 256),
        ),
        Sample("palette-transparent.png", _palette_transparent(), None),
    ]
    for name in ("AdobeRGB1998.icc", "ProPhotoRGB.icc"):
        icc = profile_bytes(name)
        if icc is not None:
            samples.append(
                Sample(f"wide-gamut-{name}.jpg", encode(picture, "JPEG", quality=95, icc_profile=icc), None)
            )
    return samples


def _palette_transparent() -> bytes:
    image = Image.new("P", (64, 48), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    ImageDraw.Draw(image).rectangle((0, 0, 31, 47), fill=1)
    return encode(image, "PNG", transparency=0)


def heif_box_patched(data: bytes, box: bytes, body: bytes) -> bytes:
    """The file with the body of the first `box` (after its version and flags) replaced."""
    at = data.index(box) + 4 + 4  # the box type, then version and flags
    return data[:at] + body + data[at + len(body) :]


def heic_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A small HEIC whose image property declares width x height pixels."""
    return heif_box_patched(phone_heic(orientation=1), b"ispe", struct.pack(">II", width, height))


def avif_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    return heif_box_patched(phone_avif(orientation=1), b"ispe", struct.pack(">II", width, height))


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))
