"""Per-batch output options through the real service: given at upload, checked, stored,
echoed, honoured by every runner (threads in the web process, image worker processes,
and the task body Celery workers call), and sent with the webhook."""

import io
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from app.composition import build_parts
from app.db.models import Image as ImageRow
from app.db.models import ProcessingRequest
from app.db.session import writer_sessionmaker
from app.ledger.held import HeldClaims
from app.main import create_app
from app.pipeline import options as options_module
from app.pipeline.compress import Encoding, compress_image
from app.pipeline.options import OutputOptions, avif_supported
from app.services.batches import create_batch
from app.tasks import process_image, process_next_images
from tests.conftest import csv_of, wait_finished
from tests.support import images
from tests.test_process import LIMITS

RUNNERS = {"threads": 0, "image processes": 1}


def upload_with(client: TestClient, csv_bytes: bytes, **form):
    return client.post("/upload", files={"file": ("products.csv", csv_bytes, "text/csv")}, data=form)


def run_batch(client: TestClient, image_server, data: bytes, **form) -> tuple[dict, dict, bytes]:
    """One image through the service; its status, its image's result and output bytes."""
    url = image_server.add(data)
    response = upload_with(client, csv_of([(1, "A", [url])]), **form)
    assert response.status_code == 202, response.text
    status = wait_finished(client, response.json()["request_id"])
    (image,) = status["products"][0]["images"]
    assert image["status"] == "succeeded", image
    output = client.get(image["output_url"].removeprefix("http://testserver"))
    assert output.status_code == 200
    return status, image, output


@pytest.fixture(params=list(RUNNERS), scope="module")
def runner_processes(request) -> int:
    return RUNNERS[request.param]


@pytest.fixture
def runner_client(make_settings, runner_processes):
    with TestClient(create_app(make_settings(image_processes=runner_processes))) as client:
        yield client


def test_default_outputs_are_optimized_baseline_jpegs_at_jpeg_quality(client, image_server):
    source = images.jpeg((640, 480))
    status, image, output = run_batch(client, image_server, source)
    expected = compress_image(source, Encoding(50, optimize=True), max_pixels=10**8).data
    assert output.content == expected
    assert len(expected) < len(compress_image(source, Encoding(50), max_pixels=10**8).data)
    assert output.headers["content-type"] == "image/jpeg" and image["output_url"].endswith(".jpg")
    assert status["options"] == {
        "quality": 50,
        "format": "jpeg",
        "max_width": None,
        "max_height": None,
        "keep_smaller": False,
        "progressive": False,
    }


def test_jpeg_optimize_false_gives_pillows_default_tables(make_settings, image_server):
    source = images.jpeg((640, 480))
    with TestClient(create_app(make_settings(jpeg_optimize=False))) as client:
        _, _, output = run_batch(client, image_server, source)
    assert output.content == compress_image(source, Encoding(50), max_pixels=10**8).data


def test_quality_and_largest_size_on_each_runner(runner_client, image_server):
    status, image, output = run_batch(
        runner_client,
        image_server,
        images.jpeg((2400, 1800)),
        quality="80",
        max_width="1000",
        max_height="1000",
    )
    out = Image.open(io.BytesIO(output.content))
    reference = Image.open(io.BytesIO(images.encode(images.photo_like((64, 64)), "JPEG", quality=80)))
    assert out.quantization == reference.quantization
    assert out.size == (1000, 750) == (image["width"], image["height"])
    assert status["options"]["quality"] == 80 and status["options"]["max_width"] == 1000


def test_progressive_option_on_each_runner(runner_client, image_server):
    _, _, output = run_batch(runner_client, image_server, images.jpeg(), progressive="true")
    assert Image.open(io.BytesIO(output.content)).info.get("progressive")


def test_webp_outputs_on_each_runner(runner_client, image_server):
    _, image, output = run_batch(runner_client, image_server, images.png_rgba(), format="webp")
    assert output.content[:4] == b"RIFF" and output.content[8:12] == b"WEBP"
    assert image["output_url"].endswith(".webp") and output.headers["content-type"] == "image/webp"


@pytest.mark.skipif(not avif_supported(), reason="this Pillow cannot write AVIF")
def test_avif_outputs_on_each_runner(runner_client, image_server):
    _, image, output = run_batch(runner_client, image_server, images.jpeg(), format="AVIF")
    assert output.content[4:12] in (b"ftypavif", b"ftypavis")
    assert image["output_url"].endswith(".avif") and output.headers["content-type"] == "image/avif"


def test_keep_smaller_keeps_an_already_small_jpeg_on_each_runner(runner_client, image_server):
    small = images.encode(images.photo_like((320, 240)), "JPEG", quality=20)
    _, image, output = run_batch(runner_client, image_server, small, quality="90", keep_smaller="true")
    assert output.content == small and image["kept_original"] is True
    assert image["output_bytes"] == image["input_bytes"] == len(small)
    _, image, output = run_batch(runner_client, image_server, small, quality="90")
    assert output.content != small and image["kept_original"] is False


def test_the_webhook_payload_includes_the_options(client, image_server, webhook_receiver):
    hook = webhook_receiver.new_url()
    response = upload_with(
        client, csv_of([(1, "A", [image_server.add(images.jpeg())])]), webhook_url=hook, format="webp"
    )
    (delivery,) = webhook_receiver.wait_for(hook, 1)
    payload = json.loads(delivery.body)
    assert payload["options"]["format"] == "webp" and payload["options"]["quality"] == 50
    assert payload["request_id"] == response.json()["request_id"]


def test_the_celery_task_body_honours_the_options(make_settings, image_server, media_root):
    """Celery workers run process_next_images; the options come with the claim."""
    services = build_parts(make_settings(), runs_images=True)
    try:
        with writer_sessionmaker(services.engine).begin() as session:
            request = create_batch(
                session,
                io.BytesIO(csv_of([(1, "A", [image_server.add(images.jpeg())])])),
                LIMITS,
                webhook_url=None,
                owner=None,
                options=OutputOptions(quality=70, format="webp"),
            )
            request_pk = request.id
        with ThreadPoolExecutor(2) as pool:
            done = process_next_images(
                services.ledger,
                services.stages,
                HeldClaims(),
                pool,
                limit=10,
                after_request_pk=0,
                stopping=threading.Event(),
            )
        assert done.claimed == 1
        with writer_sessionmaker(services.engine)() as session:
            assert session.scalar(
                select(ProcessingRequest.status).where(ProcessingRequest.id == request_pk)
            ) == ("completed")
        (output,) = media_root.rglob("*.webp")
        assert output.read_bytes()[8:12] == b"WEBP"
    finally:
        services.close()


INVALID = [
    ("quality", "0"),
    ("quality", "96"),
    ("quality", "fifty"),
    ("quality", "5.5"),
    ("max_width", "0"),
    ("max_width", "20001"),
    ("max_width", "-1"),
    ("max_height", "0"),
    ("max_height", "20001"),
    ("max_height", "wide"),
    ("format", "png"),
    ("format", "jpg2000"),
    ("keep_smaller", "maybe"),
    ("keep_smaller", "2"),
    ("progressive", "sometimes"),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_an_invalid_option_is_a_422_naming_the_field_and_nothing_is_stored(
    client, image_server, field, value
):
    response = upload_with(client, csv_of([(1, "A", [image_server.add(images.jpeg())])]), **{field: value})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert [error["field"] for error in response.json()["errors"]] == [field]
    assert client.get("/requests").json()["items"] == []


def test_every_invalid_option_is_named_at_once(client, image_server):
    response = upload_with(
        client,
        csv_of([(1, "A", [image_server.add(images.jpeg())])]),
        quality="100",
        format="gif",
        max_height="0",
    )
    assert {error["field"] for error in response.json()["errors"]} == {"quality", "format", "max_height"}


def test_avif_without_a_pillow_that_writes_it_is_a_422_saying_so(client, image_server, monkeypatch):
    monkeypatch.setattr(options_module, "avif_supported", lambda: False)
    response = upload_with(client, csv_of([(1, "A", [image_server.add(images.jpeg())])]), format="avif")
    assert response.status_code == 422
    (error,) = response.json()["errors"]
    assert error["field"] == "format" and "cannot write AVIF" in error["message"]


def run_one(client: TestClient, image_server, data: bytes) -> dict:
    response = upload_with(client, csv_of([(1, "A", [image_server.add(data)])]))
    assert response.status_code == 202, response.text
    (image,) = wait_finished(client, response.json()["request_id"])["products"][0]["images"]
    return image


def test_jpeg_quality_and_jpeg_progressive_settings_are_the_defaults_of_a_batch(make_settings, image_server):
    """Both where a batch's options come from (upload) and where a request stored without
    options (created before options existed) is encoded (the stages' default)."""
    settings = make_settings(jpeg_quality=80, jpeg_progressive=True)
    reference = Image.open(io.BytesIO(images.encode(images.photo_like((64, 64)), "JPEG", quality=80)))
    with TestClient(create_app(settings)) as client:
        status, _, output = run_batch(client, image_server, images.jpeg((200, 150)))
    out = Image.open(io.BytesIO(output.content))
    assert out.quantization == reference.quantization and out.info.get("progressive")
    assert status["options"]["quality"] == 80 and status["options"]["progressive"] is True

    services = build_parts(settings, runs_images=True)
    try:
        with writer_sessionmaker(services.engine).begin() as session:
            rows = csv_of([(1, "A", [image_server.add(images.jpeg((200, 150)))])])
            request = create_batch(session, io.BytesIO(rows), LIMITS, webhook_url=None, owner=None)
            assert request.options is None
            image_id = session.scalar(select(ImageRow.id).where(ImageRow.request_pk == request.id))
        process_image(services.ledger, services.stages, image_id)
        with writer_sessionmaker(services.engine)() as session:
            output_key = session.get(ImageRow, image_id).output_key
    finally:
        services.close()
    out = Image.open(settings.media_root / output_key)
    assert out.quantization == reference.quantization and out.info.get("progressive")


def test_max_image_pixels_setting_refuses_a_larger_image_on_each_runner(
    make_settings, image_server, runner_processes
):
    source = images.jpeg((40, 30))
    with TestClient(
        create_app(make_settings(max_image_pixels=40 * 30, image_processes=runner_processes))
    ) as client:
        assert run_one(client, image_server, source)["status"] == "succeeded"
    with TestClient(
        create_app(make_settings(max_image_pixels=40 * 30 - 1, image_processes=runner_processes))
    ) as client:
        assert run_one(client, image_server, source)["error"]["code"] == "decompression_bomb"


def test_worker_memory_mb_setting_is_the_budget_on_each_runner(make_settings, image_server, runner_processes):
    source = images.jpeg((1000, 1000))  # about 3 MB of pixels, more once encoded
    with TestClient(
        create_app(make_settings(worker_memory_mb=1, image_processes=runner_processes))
    ) as client:
        image = run_one(client, image_server, source)
    assert image["error"]["code"] == "over_memory_budget" and "is 1 MB" in image["error"]["message"]
    with TestClient(
        create_app(make_settings(worker_memory_mb=64, image_processes=runner_processes))
    ) as client:
        assert run_one(client, image_server, source)["status"] == "succeeded"


@pytest.mark.parametrize(
    "image_format",
    [
        "webp",
        pytest.param(
            "avif", marks=pytest.mark.skipif(not avif_supported(), reason="this Pillow cannot write AVIF")
        ),
    ],
)
def test_the_quality_option_changes_webp_and_avif_outputs(client, image_server, image_format):
    source = images.jpeg((320, 240))
    sizes = {}
    for quality in ("10", "90"):
        _, _, output = run_batch(client, image_server, source, format=image_format, quality=quality)
        sizes[quality] = len(output.content)
        if image_format == "webp":  # libwebp's output is the same for the same input and settings
            expected = Encoding(int(quality), output_format="WEBP")
            assert output.content == compress_image(source, expected, max_pixels=10**8).data
    assert sizes["10"] < sizes["90"]
