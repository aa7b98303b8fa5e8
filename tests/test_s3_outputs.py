"""The service with STORAGE_BACKEND=s3, on a real moto server: outputs are objects, the
database keeps keys, and output URLs are built when read."""

import io

import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.storage import thumbnail_key
from tests.conftest import csv_of, stored_keys, upload, wait_finished
from tests.support import images
from tests.support.s3_server import TEST_REGION

pytestmark = pytest.mark.slow


@pytest.fixture
def s3_settings(make_settings, aws_environment, moto_server, bucket):
    def make(**overrides):
        return make_settings(
            storage_backend="s3",
            s3_bucket=bucket,
            s3_prefix="outputs",
            s3_endpoint_url=moto_server.endpoint_url,
            s3_region=TEST_REGION,
            **overrides,
        )

    return make


def test_a_batch_stores_its_outputs_as_objects_served_through_presigned_redirects(
    s3_settings,
    image_server,
    s3_admin,
    bucket,
    moto_server,
):
    sources = [images.jpeg((320, 240)), images.png_rgba((200, 100)), images.cmyk_jpeg((64, 48))]
    with TestClient(create_app(s3_settings())) as client:
        request_id = upload(client, csv_of([(1, "A", [image_server.add(data) for data in sources])])).json()[
            "request_id"
        ]
        status = wait_finished(client, request_id)
        assert status["status"] == "completed"
        results = status["products"][0]["images"]
        keys = [
            result["output_url"].removeprefix("http://testserver/processed_images/") for result in results
        ]
        assert all(key.startswith(f"{request_id}/") and key.endswith(".jpg") for key in keys)
        # Each output with its thumbnail beside it, made by the stage.
        thumbnails = [thumbnail_key(request_id, int(key.split("/")[1].split(".")[0])) for key in keys]
        assert stored_keys(s3_admin, bucket) == sorted(f"outputs/{key}" for key in keys + thumbnails)

        for key, result in zip(keys, results, strict=True):
            head = s3_admin.head_object(Bucket=bucket, Key=f"outputs/{key}")
            assert head["ContentType"] == "image/jpeg"
            assert "max-age=31536000" in head["CacheControl"]
            redirect = client.get(f"/processed_images/{key}", follow_redirects=False)
            assert redirect.status_code == 302
            presigned = redirect.headers["location"]
            assert presigned.startswith(f"{moto_server.endpoint_url}/{bucket}/outputs/{key}?")
            fetched = requests.get(presigned, timeout=10)
            assert fetched.status_code == 200
            output = Image.open(io.BytesIO(fetched.content))
            assert (output.format, output.size) == ("JPEG", (result["width"], result["height"]))

        assert client.get("/processed_images/not-an-output.jpg").status_code == 404
        assert client.get(f"/processed_images/{request_id}/.incoming/x.jpg").status_code == 404
        csv_text = client.get(f"/download/{request_id}").text
        assert all(f"http://testserver/processed_images/{key}" in csv_text for key in keys)


def test_with_a_public_media_base_url_output_urls_point_there(s3_settings, image_server):
    settings = s3_settings(media_public_base_url="https://cdn.example.com/outputs/")
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [image_server.add(images.jpeg())])])).json()[
            "request_id"
        ]
        status = wait_finished(client, request_id)
    (url,) = status["products"][0]["output_image_urls"]
    assert url.startswith(f"https://cdn.example.com/outputs/{request_id}/") and url.endswith(".jpg")
