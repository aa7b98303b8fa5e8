"""AVIF outputs carry the colour profile the compress stage decided on, and no other."""

import io

import pytest
from PIL import Image, ImageCms

from app.pipeline.compress import Encoding, compress_image
from app.pipeline.options import avif_supported
from tests.support import images

pytestmark = pytest.mark.skipif(not avif_supported(), reason="this Pillow cannot write AVIF")

AVIF = Encoding(60, output_format="AVIF")


def _jpeg_with_profile(profile: ImageCms.ImageCmsProfile) -> tuple[bytes, bytes]:
    icc = profile.tobytes()
    return images.encode(images.photo_like((120, 90)), "JPEG", quality=95, icc_profile=icc), icc


def test_a_profile_that_does_not_describe_the_output_is_not_kept_in_an_avif():
    # An RGB image whose profile says Lab: the stage drops the profile, and the AVIF
    # encoder must not take it back from the source's info.
    data, icc = _jpeg_with_profile(ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")))
    assert Image.open(io.BytesIO(data)).info["icc_profile"] == icc
    output = compress_image(data, AVIF, max_pixels=1_000_000).data
    avif = Image.open(io.BytesIO(output))
    assert avif.format == "AVIF"
    assert not avif.info.get("icc_profile")


def test_with_color_profile_keep_an_rgb_profile_is_kept_in_an_avif():
    data, icc = _jpeg_with_profile(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")))
    output = compress_image(
        data, Encoding(60, output_format="AVIF", color_profile="keep"), max_pixels=1_000_000
    ).data
    assert Image.open(io.BytesIO(output)).info.get("icc_profile") == icc
