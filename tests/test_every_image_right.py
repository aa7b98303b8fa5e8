"""Every image right, through the real service: phone photos (HEIC, JPEG, WebP, AVIF)
stored sideways with GPS, a serial number, a maker note and XMP; CMYK; wide-gamut RGB;
animations; 16-bit; palette with transparency. For each output format, with and without
keep_smaller: every output is L or RGB, upright, in sRGB without a profile, carries no
private metadata and keeps the copyright; its thumbnail and its width and height in the
status are what a browser shows."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import ExifTags, Image, ImageChops, ImageStat

from app.main import create_app
from app.pipeline.compress import Encoding, compress_image
from app.pipeline.failures import CorruptImage, DecompressionBomb
from tests.conftest import csv_of, wait_finished
from tests.support import corpus

EXTENSION_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "avif": "AVIF"}


def mean_difference(image: Image.Image, expected: Image.Image) -> float:
    """Mean absolute difference a sample, 0-255, of two pictures at the expected size."""
    image = image.convert("RGB").resize(expected.size, Image.Resampling.BILINEAR)
    return sum(ImageStat.Stat(ImageChops.difference(image, expected.convert("RGB"))).mean) / 3


def _run_corpus(client: TestClient, image_server, samples, **form) -> tuple[str, list[dict]]:
    rows = [(n + 1, sample.name, [image_server.add(sample.data)]) for n, sample in enumerate(samples)]
    response = client.post("/upload", files={"file": ("p.csv", csv_of(rows), "text/csv")}, data=form)
    assert response.status_code == 202, response.text
    status = wait_finished(client, response.json()["request_id"], timeout=120)
    products = sorted(status["products"], key=lambda product: product["serial_number"])
    return status["request_id"], [product["images"][0] for product in products]


def _get(client: TestClient, url: str) -> bytes:
    answer = client.get(url.removeprefix("http://testserver"))
    assert answer.status_code == 200, url
    return answer.content


def _assert_private_metadata_gone(data: bytes, image: Image.Image, name: str) -> None:
    for leak in corpus.LEAKS:
        assert leak not in data, (name, leak)
    assert b"adobe:ns:meta" not in data and not image.info.get("xmp"), name
    assert "comment" not in image.info, name
    exif = image.getexif()
    assert not exif.get_ifd(ExifTags.IFD.GPSInfo), name
    assert not exif.get_ifd(ExifTags.IFD.Exif), name  # serial numbers, maker notes
    assert ExifTags.Base.Orientation not in exif, name
    assert set(exif) <= {ExifTags.Base.Copyright, ExifTags.Base.Artist}, (name, dict(exif))


@pytest.mark.parametrize("keep_smaller", [False, True])
@pytest.mark.parametrize("output_format", ["jpeg", "webp", "avif"])
def test_every_output_of_the_corpus_is_right(client, image_server, output_format, keep_smaller):
    samples = corpus.corpus()
    request_id, results = _run_corpus(
        client, image_server, samples, format=output_format, keep_smaller=str(keep_smaller).lower()
    )
    kept = set()
    for sample, result in zip(samples, results, strict=True):
        assert result["status"] == "succeeded", (sample.name, result)
        data = _get(client, result["output_url"])
        output = Image.open(io.BytesIO(data))
        assert output.format == EXTENSION_FORMAT[result["output_url"].rsplit(".", 1)[1]]
        assert output.format == {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}[output_format]
        assert output.mode in ("L", "RGB"), (sample.name, output.mode)
        assert not output.info.get("icc_profile"), sample.name  # COLOR_PROFILE=srgb
        _assert_private_metadata_gone(data, output, sample.name)
        exif = output.getexif()
        if sample.copyright:
            assert exif.get(ExifTags.Base.Copyright) == corpus.COPYRIGHT, sample.name
            assert exif.get(ExifTags.Base.Artist) == corpus.ARTIST, sample.name
        # What the status says is what a browser shows.
        assert (result["width"], result["height"]) == output.size, sample.name
        if sample.upright is not None:
            assert output.size == sample.upright.size, sample.name
            assert mean_difference(output, sample.upright) < 12, sample.name
        thumbnail = Image.open(
            io.BytesIO(_get(client, f"/thumbnails/{request_id}/{result['output_url'].rsplit('/', 1)[1]}"))
        )
        scale = 240 / max(output.size)
        if scale < 1:
            assert thumbnail.size == (round(output.width * scale), round(output.height * scale)), sample.name
        if sample.upright is not None:
            assert mean_difference(thumbnail, sample.upright.resize(thumbnail.size)) < 14, sample.name
        if result["kept_original"]:
            kept.add(sample.name)
            # The original's own pixels, only its metadata rewritten.
            original = Image.open(io.BytesIO(sample.data))
            assert output.tobytes() == original.convert(output.mode).tobytes(), sample.name
            assert len(data) < len(sample.data), sample.name
    # Only an upright original already in the output format, in RGB, is ever kept.
    expected = {"jpeg": {"phone-upright.jpg"}, "webp": {"phone-upright.webp"}, "avif": set()}
    assert kept == (expected[output_format] if keep_smaller else set())


def test_metadata_none_publishes_no_metadata_at_all(make_settings, image_server):
    samples = [
        s for s in corpus.corpus() if s.name in ("phone.heic", "phone-upright.jpg", "phone-upright.webp")
    ]
    with TestClient(create_app(make_settings(metadata="none"))) as client:
        for output_format in ("jpeg", "webp"):
            _, results = _run_corpus(client, image_server, samples, format=output_format, keep_smaller="true")
            assert any(result["kept_original"] for result in results)
            for sample, result in zip(samples, results, strict=True):
                data = _get(client, result["output_url"])
                output = Image.open(io.BytesIO(data))
                assert not output.getexif(), (sample.name, dict(output.getexif()))
                assert corpus.COPYRIGHT.encode() not in data and b"Exif" not in data, sample.name


def test_a_kept_cmyk_or_sideways_original_would_not_be_right_so_the_re_encode_is_stored():
    # JPEGs smaller than their quality-95 re-encode (or CMYK, which a browser may show
    # wrongly, whatever its size) are still not kept.
    picture = corpus.upright()
    for data, smaller in (
        (corpus.encode(picture.convert("CMYK"), "JPEG", quality=1), False),
        (corpus.phone_jpeg(orientation=6, quality=10), True),
    ):
        result = compress_image(data, Encoding(95, keep_smaller=True), max_pixels=10**7, thumbnail_side=240)
        assert len(result.data) > len(data) or not smaller
        assert not result.kept_original
        assert Image.open(io.BytesIO(result.data)).mode == "RGB"
        if smaller:  # upright (Pillow's CMYK is no press separation: its colours differ)
            assert mean_difference(Image.open(io.BytesIO(result.data)), picture) < 20


def _refused_before_admission(data: bytes, error: type) -> str:
    admitted: list[int] = []

    def admission(cost: int):
        admitted.append(cost)
        raise AssertionError("admitted")

    with pytest.raises(error) as failure:
        compress_image(data, Encoding(50), max_pixels=100_000_000, admission=admission)
    assert admitted == []  # refused from the header: no memory reserved, no pixel decoded
    return failure.value.message


def test_heif_and_avif_bombs_are_refused_from_their_declared_size():
    assert "60000x60000" in _refused_before_admission(corpus.heic_bomb(), DecompressionBomb)
    assert "60000x60000" in _refused_before_admission(corpus.avif_bomb(), DecompressionBomb)


def test_truncated_heif_and_avif_are_corrupt_not_unknown():
    for data in (corpus.phone_heic(), corpus.phone_avif()):
        for cut in (40, 200, len(data) // 2, len(data) - 10):
            with pytest.raises(CorruptImage):
                compress_image(data[:cut], Encoding(50), max_pixels=100_000_000)


def test_bad_heif_and_avif_fail_alone_with_clear_codes_and_the_worker_goes_on(make_settings, image_server):
    heic, avif = corpus.phone_heic(), corpus.phone_avif()
    inputs = [
        ("heic bomb", corpus.heic_bomb(), "decompression_bomb"),
        ("avif bomb", corpus.avif_bomb(), "decompression_bomb"),
        ("truncated heic", heic[: len(heic) // 2], "corrupt_image"),
        ("truncated heic header", heic[:200], "corrupt_image"),
        ("truncated avif", avif[: len(avif) // 2], "corrupt_image"),
        ("heic", heic, None),
        ("avif", avif, None),
    ]
    with TestClient(create_app(make_settings(image_processes=1))) as client:
        rows = [(n + 1, name, [image_server.add(data)]) for n, (name, data, _code) in enumerate(inputs)]
        response = client.post("/upload", files={"file": ("p.csv", csv_of(rows), "text/csv")})
        assert response.status_code == 202, response.text
        status = wait_finished(client, response.json()["request_id"], timeout=60)
        products = sorted(status["products"], key=lambda product: product["serial_number"])
        codes = [(product["images"][0]["error"] or {}).get("code") for product in products]
        assert codes == [code for _name, _data, code in inputs], [p["images"][0] for p in products]
        # The same worker process goes on with a later batch.
        response = client.post(
            "/upload", files={"file": ("p.csv", csv_of([(1, "again", [image_server.add(heic)])]), "text/csv")}
        )
        again = wait_finished(client, response.json()["request_id"], timeout=60)
        assert again["products"][0]["images"][0]["status"] == "succeeded"


def test_a_copyright_in_utf_8_is_published_byte_for_byte():
    # Pillow's own EXIF writer would turn every non-ASCII byte into "?".
    copyright = "© 2026 Müller & Söhne".encode()
    field = copyright + b"\0"
    tiff = b"MM\x00*\x00\x00\x00\x08\x00\x01\x82\x98\x00\x02" + len(field).to_bytes(4, "big")
    tiff += (8 + 2 + 12 + 4).to_bytes(4, "big") + b"\x00\x00\x00\x00" + field
    data = corpus.encode(corpus.upright(), "JPEG", quality=90, exif=b"Exif\x00\x00" + tiff)
    assert Image.open(io.BytesIO(data)).getexif()[ExifTags.Base.Copyright].encode("latin-1") == copyright
    for output_format in ("JPEG", "WEBP", "AVIF"):
        result = compress_image(data, Encoding(50, output_format=output_format), max_pixels=10**7)
        assert field in result.data, output_format


@pytest.mark.parametrize(
    "params",
    [{"progressive": True}, {"restart_marker_blocks": 1}, {"progressive": True, "restart_marker_rows": 1}],
)
def test_a_kept_jpeg_is_rewritten_segment_by_segment_whatever_its_scans(params):
    source = corpus.encode(
        corpus.upright(),
        "JPEG",
        quality=10,
        optimize=True,
        exif=corpus.phone_exif(1),
        xmp=corpus.XMP,
        **params,
    )
    trailer = corpus.encode(Image.new("RGB", (8, 8)), "JPEG", exif=corpus.phone_exif(1))  # as phones append
    data = source + trailer
    result = compress_image(data, Encoding(95, keep_smaller=True), max_pixels=10**7)
    assert result.kept_original
    _assert_private_metadata_gone(result.data, Image.open(io.BytesIO(result.data)), str(params))
    assert result.data.endswith(b"\xff\xd9") and result.data.count(b"\xff\xd8") == 1
    kept, original = Image.open(io.BytesIO(result.data)), Image.open(io.BytesIO(source))
    assert kept.tobytes() == original.tobytes()
    assert kept.getexif().get(ExifTags.Base.Copyright) == corpus.COPYRIGHT
