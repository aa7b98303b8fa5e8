"""Thumbnails are made by the image stage, under its memory budget, and stored beside the
output; the web process only serves stored bytes and never opens an image for them."""

import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.services.thumbnails import PLACEHOLDER
from app.storage import thumbnail_key
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.s3_server import TEST_REGION

OPEN_IMAGE = Image.open  # kept before any test counts calls to it


@pytest.fixture
def image_opens(monkeypatch) -> list[object]:
    """Every Image.open call in this process from now on (the test's own use OPEN_IMAGE)."""
    calls: list[object] = []

    def counted_open(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("fp"))
        return OPEN_IMAGE(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counted_open)
    return calls


def _finished_batch(client: TestClient, image_server, sources: list[bytes], **form) -> dict:
    urls = [image_server.add(data) for data in sources]
    response = client.post(
        "/upload", files={"file": ("p.csv", csv_of([(1, "A", urls)]), "text/csv")}, data=form
    )
    assert response.status_code == 202, response.text
    status = wait_finished(client, response.json()["request_id"])
    assert status["status"] == "completed", status
    return status


def _file_name(output_url: str) -> str:
    return output_url.rsplit("/", 1)[1]


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_the_stage_stores_the_thumbnail_and_the_route_serves_it_without_opening_an_image(
    client, image_server, media_root, image_opens, output_format
):
    sources = [images.jpeg((1000, 600)), images.exif_rotated_jpeg((300, 100), orientation=6)]
    status = _finished_batch(client, image_server, sources, format=output_format)
    request_id = status["request_id"]
    results = status["products"][0]["images"]
    image_opens.clear()  # the stage's own decodes ran in this process (IMAGE_PROCESSES=0)

    for result, expected_size in zip(results, [(240, 144), (80, 240)], strict=True):
        file_name = _file_name(result["output_url"])
        image_id = int(file_name.split(".")[0])
        stored = (media_root / thumbnail_key(request_id, image_id)).read_bytes()  # before any GET
        answer = client.get(f"/thumbnails/{request_id}/{file_name}")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/jpeg"
        assert "max-age=31536000" in answer.headers["cache-control"]
        assert answer.content == stored
        thumbnail = OPEN_IMAGE(io.BytesIO(answer.content))
        assert (thumbnail.format, thumbnail.size) == ("JPEG", expected_size)
        # The status the pages size their <img> by describes the same picture.
        scale = 240 / max(result["width"], result["height"])
        assert (round(result["width"] * scale), round(result["height"] * scale)) == expected_size
    assert image_opens == []


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_a_jpeg_output_within_the_thumbnail_box_is_its_own_thumbnail(
    client, image_server, media_root, output_format
):
    status = _finished_batch(client, image_server, [images.jpeg((64, 48))], format=output_format)
    result = status["products"][0]["images"][0]
    file_name = _file_name(result["output_url"])
    image_id = int(file_name.split(".")[0])
    thumbnail = (media_root / thumbnail_key(status["request_id"], image_id)).read_bytes()
    output = client.get(f"/thumbnails/{status['request_id']}/{file_name}")
    assert output.status_code == 200 and output.content == thumbnail
    assert OPEN_IMAGE(io.BytesIO(thumbnail)).size == (64, 48)
    output_bytes = client.get(result["output_url"]).content
    # A WebP output still gets a JPEG thumbnail of its own.
    assert (thumbnail == output_bytes) is (output_format == "jpeg")
    assert OPEN_IMAGE(io.BytesIO(thumbnail)).format == "JPEG"


def test_an_output_stored_without_a_thumbnail_gets_the_placeholder_not_a_decode(
    client, image_server, media_root, image_opens
):
    status = _finished_batch(client, image_server, [images.jpeg((1000, 600))])
    request_id = status["request_id"]
    file_name = _file_name(status["products"][0]["output_image_urls"][0])
    # As an output stored before the stage made thumbnails.
    (media_root / thumbnail_key(request_id, int(file_name.split(".")[0]))).unlink()
    image_opens.clear()

    for _ in range(2):  # and the second time too: nothing is made on request
        answer = client.get(f"/thumbnails/{request_id}/{file_name}")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/svg+xml"
        assert answer.content == PLACEHOLDER
        assert "immutable" not in answer.headers["cache-control"]
    assert image_opens == []
    assert not (media_root / request_id / "thumbs").exists() or not any(
        (media_root / request_id / "thumbs").iterdir()
    )


@pytest.mark.slow
def test_with_s3_storage_the_thumbnail_is_an_object_beside_the_output(
    make_settings, aws_environment, moto_server, bucket, s3_admin, image_server, image_opens
):
    settings = make_settings(
        storage_backend="s3",
        s3_bucket=bucket,
        s3_prefix="outputs",
        s3_endpoint_url=moto_server.endpoint_url,
        s3_region=TEST_REGION,
    )
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [image_server.add(images.jpeg((1000, 600)))])])).json()[
            "request_id"
        ]
        file_name = _file_name(wait_finished(client, request_id)["products"][0]["output_image_urls"][0])
        key = f"outputs/{thumbnail_key(request_id, int(file_name.split('.')[0]))}"
        stored = s3_admin.get_object(Bucket=bucket, Key=key)["Body"].read()
        image_opens.clear()
        answer = client.get(f"/thumbnails/{request_id}/{file_name}")
        assert answer.status_code == 200 and answer.content == stored
        assert OPEN_IMAGE(io.BytesIO(stored)).size == (240, 144)

        s3_admin.delete_object(Bucket=bucket, Key=key)
        placeholder = client.get(f"/thumbnails/{request_id}/{file_name}")
        assert placeholder.status_code == 200 and placeholder.content == PLACEHOLDER
        assert client.get(f"/thumbnails/{request_id}/999999.jpg").status_code == 404
    assert image_opens == []
