"""Colour: every output in sRGB without a profile (COLOR_PROFILE=srgb, the default), or
the source's profile kept where it still describes the output (COLOR_PROFILE=keep).

Browsers and most tools read an untagged image as sRGB, so converting with LittleCMS
(Pillow's ImageCms) and dropping the profile shows the same colours everywhere and saves
the profile's bytes (a camera's or print department's profile can be larger than a
thumbnail-sized image). Conversions use the relative colorimetric intent with black
point compensation, as most image tools do.

CMYK without a profile (an Adobe APP14 JPEG with no ICC segment, say) is taken as
printed on ISO coated offset paper (FOGRA39, the usual European press condition): the
ink is first folded into C', M', Y' = 1 - (1 - C)(1 - K)... (Pillow's CMYK to RGB), then
a 3-D table maps C'M'Y' to sRGB through a Demichel-Neugebauer model of the print: the
measured colours of paper and of the seven solid overprints of C, M and Y (FOGRA39L
characterisation data), mixed in linear light by each ink's coverage after a dot gain
of 15% at mid-tone, taken relative to the paper white (as the relative colorimetric
intent does). Against the 1617 FOGRA39 measurements, through this stage, the mean colour
difference is about 6 Delta E 1976 where sRGB can show the colour (Pillow's formula
alone: about 25), enough to show the picture as printed though not to proof it;
tests/test_colour.py measures it. CMYK with a profile is converted through the profile.
"""

import io
from functools import lru_cache

from PIL import Image, ImageCms, ImageFilter

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
    """An RGB image's pixels in sRGB, converted in place (no second copy of the pixels)
    unless they are read-only (pillow-heif's are its decoder's buffer); unchanged when it
    has no profile, an sRGB one or one that cannot be read."""
    if profile_colour_space(icc_profile) != b"RGB " or is_srgb(icc_profile):
        return image
    transform = _to_srgb(icc_profile, "RGB")
    if transform is None:
        return image
    if image.readonly:
        return ImageCms.applyTransform(image, transform)
    ImageCms.applyTransform(image, transform, inPlace=True)
    return image


# FOGRA39L, CIE XYZ (D50, 2 degrees) of the paper and the solid overprints, by (C, M, Y).
FOGRA39_SOLIDS = {
    (0, 0, 0): (84.48, 87.62, 74.57),
    (0, 0, 1): (69.17, 74.16, 7.04),
    (0, 1, 0): (33.03, 16.79, 15.01),
    (0, 1, 1): (30.20, 16.02, 2.30),
    (1, 0, 0): (15.02, 22.93, 52.85),
    (1, 0, 1): (8.16, 18.42, 6.74),
    (1, 1, 0): (5.67, 4.10, 15.67),
    (1, 1, 1): (3.66, 3.80, 3.13),
}
DOT_GAIN = 0.15  # at 50% coverage, a parabola through 0 and 100%
# CIE XYZ (D50) to linear sRGB, Bradford-adapted to sRGB's D65 white.
_XYZ_D50_TO_LINEAR_SRGB = (
    (3.1338561, -1.6168667, -0.4906146),
    (-0.9787684, 1.9161415, 0.0334540),
    (0.0719453, -0.2289914, 1.4052427),
)
_D50_WHITE = (0.9642, 1.0, 0.8249)
CMYK_TABLE_SIZE = 17


def _srgb_encoded(linear: float) -> float:
    linear = min(1.0, max(0.0, linear))
    return 12.92 * linear if linear <= 0.0031308 else 1.055 * linear ** (1 / 2.4) - 0.055


def printed_xyz(c: float, m: float, y: float) -> tuple[float, float, float]:
    """The model's XYZ (D50, paper white at the D50 white) of coverages 0-1 of C, M, Y."""
    coverage = [a + 4 * DOT_GAIN * a * (1 - a) for a in (c, m, y)]
    xyz = [0.0, 0.0, 0.0]
    for inks, solid in FOGRA39_SOLIDS.items():
        weight = 1.0
        for printed, a in zip(inks, coverage, strict=True):
            weight *= a if printed else 1 - a
        for n in range(3):
            xyz[n] += weight * solid[n]
    paper = FOGRA39_SOLIDS[(0, 0, 0)]
    return tuple(xyz[n] / paper[n] * _D50_WHITE[n] for n in range(3))


def _printed_srgb(cyan_light: float, magenta_light: float, yellow_light: float) -> tuple[float, ...]:
    # The table's inputs are Pillow's folded RGB: 1 - coverage.
    xyz = printed_xyz(1 - cyan_light, 1 - magenta_light, 1 - yellow_light)
    return tuple(_srgb_encoded(sum(row[n] * xyz[n] for n in range(3))) for row in _XYZ_D50_TO_LINEAR_SRGB)


@lru_cache(maxsize=1)
def _press_table() -> ImageFilter.Color3DLUT:
    return ImageFilter.Color3DLUT.generate(CMYK_TABLE_SIZE, _printed_srgb)


def cmyk_to_srgb(image: Image.Image, icc_profile: bytes | None) -> Image.Image:
    """A CMYK image as sRGB: through its profile when it has a readable CMYK one, else
    as printed on coated paper (FOGRA39, above)."""
    if profile_colour_space(icc_profile) == b"CMYK":
        transform = _to_srgb(icc_profile, "CMYK")
        if transform is not None:
            return ImageCms.applyTransform(image, transform)
    return image.convert("RGB").filter(_press_table())
