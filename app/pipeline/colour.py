"""Colour: every output in sRGB without a profile (COLOR_PROFILE=srgb, the default), or
the source's profile kept where it still describes the output (COLOR_PROFILE=keep).

Browsers and most tools read an untagged image as sRGB, so converting with LittleCMS
(Pillow's ImageCms) and dropping the profile shows the same colours everywhere and saves
the profile's bytes (a camera's or print department's profile can be larger than a
thumbnail-sized image). Conversions use the relative colorimetric intent with black
point compensation, as most image tools do.

CMYK without a profile (an Adobe APP14 JPEG with no ICC segment, say) is converted with
Pillow's formula, R = (1 - C)(1 - K) and likewise for G and B: the approximation every
untagged CMYK reader makes in some form. Against FOGRA39 (ISO coated offset) measurements
its mean colour difference is about 25 Delta E 1976: good enough to recognise a picture,
not to proof a print; send CMYK with its profile (every RIP and Photoshop embeds one)
for faithful colours. tests/test_colour.py measures it.
"""

import io
from functools import lru_cache

from PIL import Image, ImageCms

COLOR_PROFILES = ("srgb", "keep")
_SRGB = ImageCms.createProfile("sRGB")
# Colours a profile must map within SRGB_TOLERANCE levels of themselves to count as sRGB.
_PROBE = Image.frombytes(
    "RGB",
    (8, 1),
    bytes([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 255, 0, 0, 0, 255, 128, 128, 128, 200, 60, 30, 30, 90, 200]),
)
SRGB_TOLERANCE = 2


def profile_colour_space(icc_profile: bytes | None) -> bytes | None:
    """The colour space signature of an ICC profile (b"RGB ", b"GRAY", b"CMYK", ...)."""
    return icc_profile[16:20] if icc_profile and len(icc_profile) >= 20 else None


@lru_cache(maxsize=32)
def _to_srgb(icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A transform from the profile to sRGB for images of `mode` (RGB or CMYK) to RGB;
    None when the profile cannot be read."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
        return ImageCms.buildTransform(
            source,
            _SRGB,
            mode,
            "RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            # NOCACHE: one transform is shared by every decoding thread.
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION | ImageCms.Flags.NOCACHE,
        )
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None


@lru_cache(maxsize=32)
def is_srgb(icc_profile: bytes) -> bool:
    """Whether an RGB profile shows colours as sRGB does (within SRGB_TOLERANCE levels):
    such a profile may be dropped without converting anything."""
    if profile_colour_space(icc_profile) != b"RGB ":
        return False
    transform = _to_srgb(icc_profile, "RGB")
    if transform is None:
        return False
    converted = ImageCms.applyTransform(_PROBE, transform)
    return all(
        abs(a - b) <= SRGB_TOLERANCE for a, b in zip(converted.tobytes(), _PROBE.tobytes(), strict=True)
    )


def rgb_to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """An RGB image's pixels in sRGB, converted in place (no second copy of the pixels);
    unchanged when it has no profile, an sRGB one or one that cannot be read."""
    if profile_colour_space(icc_profile) != b"RGB " or is_srgb(icc_profile):
        return image
    transform = _to_srgb(icc_profile, "RGB")
    if transform is not None:
        ImageCms.applyTransform(image, transform, inPlace=True)
    return image


def cmyk_to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """A CMYK image as sRGB: through its profile when it has a readable CMYK one, else
    with the default approximation above."""
    if profile_colour_space(icc_profile) == b"CMYK":
        transform = _to_srgb(icc_profile, "CMYK")
        if transform is not None:
            return ImageCms.applyTransform(image, transform)
    return image.convert("RGB")
