"""Colour through the service and the compress stage, with real ICC profiles (Debian's
colord-data and icc-profiles-free; .ci/run installs them) and real press measurements
(FOGRA39L, in icc-profiles-free): COLOR_PROFILE=srgb converts to sRGB within a small
colour difference and drops the profile; keep keeps it; CMYK without a profile is shown
as printed on coated paper within the difference colour.py states."""

import io
import itertools
import math
from pathlib import Path

import pillow_heif
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageCms

from app.main import create_app
from app.pipeline.compress import Encoding, compress_image
from tests.conftest import csv_of, wait_finished
from tests.support import corpus
from tests.support.icc import cmyk_profile

FOGRA39 = Path("/usr/share/color/icc/FOGRA39L.ti3")
_SRGB_TO_LAB = ImageCms.buildTransform(
    ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB", 5000), "RGB", "LAB", renderingIntent=1
)
# Colours inside sRGB's gamut, given in the wide-gamut space, where reading the numbers
# as sRGB (dropping the profile unconverted) is visibly wrong.
PATCHES = [(110, 140, 115), (170, 130, 110), (110, 110, 170), (150, 100, 130), (128, 128, 128)]
PATCH = 32


def _profile(name: str) -> bytes:
    icc = corpus.profile_bytes(name)
    if icc is None:
        pytest.skip(f"{name} is not installed (apt-get install colord-data icc-profiles-free)")
    return icc


def _lab(pixel: tuple[int, int, int], icc: bytes | None = None) -> tuple[float, float, float]:
    """The CIE Lab (D50) of an 8-bit RGB pixel in the profile's space (sRGB by default)."""
    transform = _SRGB_TO_LAB
    if icc is not None:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        transform = ImageCms.buildTransform(
            source, ImageCms.createProfile("LAB", 5000), "RGB", "LAB", renderingIntent=1
        )
    lightness, a, b = ImageCms.applyTransform(Image.new("RGB", (1, 1), pixel), transform).getpixel((0, 0))
    return lightness * 100 / 255, a - 128, b - 128


def _patches(icc: bytes) -> bytes:
    image = Image.new("RGB", (PATCH * len(PATCHES), PATCH))
    for n, colour in enumerate(PATCHES):
        image.paste(colour, (n * PATCH, 0, (n + 1) * PATCH, PATCH))
    return corpus.encode(image, "JPEG", quality=100, subsampling=0, icc_profile=icc)


def _centre(image: Image.Image, n: int) -> tuple[int, int, int]:
    return image.convert("RGB").getpixel((n * PATCH + PATCH // 2, PATCH // 2))


def _run(client: TestClient, image_server, data: bytes, **form) -> bytes:
    url = image_server.add(data)
    response = client.post(
        "/upload", files={"file": ("p.csv", csv_of([(1, "A", [url])]), "text/csv")}, data=form
    )
    assert response.status_code == 202, response.text
    status = wait_finished(client, response.json()["request_id"])
    (result,) = status["products"][0]["images"]
    assert result["status"] == "succeeded", result
    return client.get(result["output_url"].removeprefix("http://testserver")).content


@pytest.mark.parametrize("profile", ["AdobeRGB1998.icc", "ProPhotoRGB.icc", "compatibleWithAdobeRGB1998.icc"])
@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_wide_gamut_images_become_srgb_without_a_profile(client, image_server, profile, output_format):
    icc = _profile(profile)
    output = Image.open(
        io.BytesIO(_run(client, image_server, _patches(icc), quality="95", format=output_format))
    )
    assert not output.info.get("icc_profile")
    for n, colour in enumerate(PATCHES):
        wanted = _lab(colour, icc)
        shown = _lab(_centre(output, n))
        assert math.dist(shown, wanted) < 3, (colour, shown, wanted)
    # The test tells right from wrong: the numbers read as sRGB are far off somewhere.
    assert max(math.dist(_lab(colour), _lab(colour, icc)) for colour in PATCHES) > 6


def test_color_profile_keep_keeps_the_profile_and_srgb_saves_its_bytes(make_settings, image_server):
    icc = _profile("AdobeRGB1998.icc")
    data = _patches(icc)
    with TestClient(create_app(make_settings(color_profile="keep"))) as client:
        kept = _run(client, image_server, data, quality="95")
    with TestClient(create_app(make_settings())) as client:
        converted = _run(client, image_server, data, quality="95")
    output = Image.open(io.BytesIO(kept))
    assert output.info.get("icc_profile") == icc
    for n, colour in enumerate(PATCHES):  # the numbers unchanged, read through the profile
        assert math.dist(_lab(_centre(output, n), icc), _lab(colour, icc)) < 2
    assert len(converted) < len(kept)


def test_an_srgb_profile_is_dropped_without_touching_the_pixels():
    icc = _profile("sRGB.icc")
    data = _patches(icc)
    output = Image.open(io.BytesIO(compress_image(data, Encoding(95), max_pixels=10**6).data))
    assert not output.info.get("icc_profile")
    for n, colour in enumerate(PATCHES):
        assert max(abs(a - b) for a, b in zip(_centre(output, n), colour, strict=True)) <= 3


def _fogra39() -> list[list[float]]:
    if not FOGRA39.is_file():
        pytest.skip("FOGRA39L.ti3 is not installed (apt-get install icc-profiles-free)")
    rows, inside = [], False
    for line in FOGRA39.read_text().splitlines():
        if line.startswith("BEGIN_DATA") and "FORMAT" not in line:
            inside = True
        elif line.startswith("END_DATA") and "FORMAT" not in line:
            break
        elif inside:
            rows.append([float(value) for value in line.split()])
    return rows  # SAMPLE_ID C M Y K X Y Z L a b


def _lab_relative_to_paper(xyz, paper) -> tuple[float, float, float]:
    """CIE Lab with the paper as white, as the relative colorimetric intent shows it."""

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 216 / 24389 else (24389 / 27 * t + 16) / 116

    fx, fy, fz = (f(v / p) for v, p in zip(xyz, paper, strict=True))
    return 116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)


def test_cmyk_without_a_profile_shows_as_printed_on_coated_paper():
    rows = _fogra39()
    paper = rows[0][5:8]
    block, columns = 16, 41
    image = Image.new("CMYK", (columns * block, math.ceil(len(rows) / columns) * block))
    for n, row in enumerate(rows):
        x, y = (n % columns) * block, (n // columns) * block
        image.paste(tuple(round(v * 2.55) for v in row[1:5]), (x, y, x + block, y + block))
    data = corpus.encode(image, "JPEG", quality=100)
    assert "adobe" in Image.open(io.BytesIO(data)).info  # an Adobe APP14 JPEG, no ICC profile
    output = Image.open(io.BytesIO(compress_image(data, Encoding(95), max_pixels=10**7).data))
    assert output.mode == "RGB" and not output.info.get("icc_profile")
    differences = []
    for n, row in enumerate(rows):
        pixel = output.getpixel(((n % columns) * block + block // 2, (n // columns) * block + block // 2))
        if all(3 < value < 252 for value in pixel):  # colours sRGB can show
            differences.append(math.dist(_lab(pixel), _lab_relative_to_paper(row[5:8], paper)))
    differences.sort()
    mean = sum(differences) / len(differences)
    print(f"{len(differences)} patches: mean {mean:.1f}, p95 {differences[int(0.95 * len(differences))]:.1f}")
    # What app/pipeline/colour.py states: about 6 on average (Pillow's formula alone: 20+).
    assert len(differences) > 1200
    assert mean < 7.5
    assert differences[int(0.95 * len(differences))] < 16


# Lab (D50) of the solids of a coated press (FOGRA39L), paper as white; the profile's
# grid corners, so that a single ink's tint is the straight line from paper to solid.
PRESS_SOLIDS = {
    (0, 0, 0, 0): (100.0, 0.0, 0.0),
    (1, 0, 0, 0): (55.0, -37.0, -50.0),
    (0, 1, 0, 0): (48.0, 74.0, -3.0),
    (0, 0, 1, 0): (89.0, -5.0, 93.0),
    (0, 0, 0, 1): (16.0, 0.0, 0.0),
}


def _press_corners() -> dict[tuple[int, int, int, int], tuple[float, float, float]]:
    """Every overprint: the darker ink's Lab darkened by the others (a plausible press)."""
    corners = {}
    for bits in itertools.product((0, 1), repeat=4):
        inks = [PRESS_SOLIDS[tuple(int(n == i) for n in range(4))] for i, on in enumerate(bits) if on]
        if not inks:
            corners[bits] = PRESS_SOLIDS[(0, 0, 0, 0)]
            continue
        lightness = 100.0
        for ink in inks:
            lightness *= ink[0] / 100
        corners[bits] = (
            max(lightness, 10.0),
            sum(i[1] for i in inks) / len(inks),
            sum(i[2] for i in inks) / len(inks),
        )
    return corners


def test_cmyk_with_a_profile_converts_through_the_profile():
    icc = cmyk_profile(_press_corners(), "Test press (FOGRA39-like)")
    tints = [(0.4, 0, 0, 0), (0, 0.4, 0, 0), (0, 0, 0.5, 0), (0, 0, 0, 0.5), (0, 0, 0, 0)]
    image = Image.new("CMYK", (PATCH * len(tints), PATCH))
    for n, tint in enumerate(tints):
        image.paste(tuple(round(v * 255) for v in tint), (n * PATCH, 0, (n + 1) * PATCH, PATCH))
    data = corpus.encode(image, "JPEG", quality=100, icc_profile=icc)
    profiled = Image.open(io.BytesIO(compress_image(data, Encoding(95), max_pixels=10**6).data))
    without = corpus.encode(image, "JPEG", quality=100)
    default = Image.open(io.BytesIO(compress_image(without, Encoding(95), max_pixels=10**6).data))
    assert profiled.mode == "RGB" and not profiled.info.get("icc_profile")
    far_from_default = 0.0
    for n, tint in enumerate(tints):
        ink = next((i for i, v in enumerate(tint) if v), None)
        paper = PRESS_SOLIDS[(0, 0, 0, 0)]
        solid = PRESS_SOLIDS[tuple(int(i == ink) for i in range(4))] if ink is not None else paper
        share = tint[ink] if ink is not None else 0
        wanted = tuple(p + share * (s - p) for p, s in zip(paper, solid, strict=True))
        assert math.dist(_lab(_centre(profiled, n)), wanted) < 3, (tint, _lab(_centre(profiled, n)), wanted)
        far_from_default = max(far_from_default, math.dist(_lab(_centre(default, n)), wanted))
    assert far_from_default > 5  # the profile was used, not the default for untagged CMYK


def test_a_heic_with_a_wide_gamut_profile_becomes_srgb():
    # pillow-heif's pixels are read-only: they are converted into a copy, not in place.
    icc = _profile("AdobeRGB1998.icc")
    image = Image.open(io.BytesIO(_patches(icc)))
    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, quality=95, icc_profile=icc)
    output = Image.open(io.BytesIO(compress_image(buffer.getvalue(), Encoding(95), max_pixels=10**6).data))
    assert not output.info.get("icc_profile")
    for n, colour in enumerate(PATCHES):
        assert math.dist(_lab(_centre(output, n)), _lab(colour, icc)) < 3, colour
