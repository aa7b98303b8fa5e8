"""Fault injection on the real service process: SIGKILL mid-batch, SIGTERM, restart."""

import signal
import time

import pytest
from sqlalchemy import func, select
from standardwebhooks import Webhook

from app.db.models import Image, ImageStatus, ProcessingRequest, WebhookEvent
from app.db.session import build_engine
from app.pipeline.decoding import NOTES_DIR_NAME, read_notes
from tests.conftest import FINISHED, csv_of
from tests.support import images
from tests.support.servers import delayed
from tests.support.service_process import ServiceProcess
from tests.test_api import SECRET

pytestmark = pytest.mark.slow

IMAGE_COUNT = 90
SERVE_DELAY_SECONDS = 0.15


@pytest.fixture
def service_env(database_url, tmp_path, image_server, webhook_receiver):
    return {
        "DATABASE_URL": database_url,
        "MEDIA_ROOT": str(tmp_path / "media"),
        "ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{image_server.port},127.0.0.1:{webhook_receiver.port}",
        "WEBHOOK_ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{image_server.port},127.0.0.1:{webhook_receiver.port}",
        "LEASE_SECONDS": "2",
        "RECOVERY_INTERVAL_SECONDS": "0.5",
        "WORKER_CONCURRENCY": "8",
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "SHUTDOWN_GRACE_SECONDS": "10",
    }


def slow_batch(image_server) -> bytes:
    urls = [
        image_server.add_handler(delayed(images.jpeg((64 + n, 48)), SERVE_DELAY_SECONDS))
        for n in range(IMAGE_COUNT)
    ]
    return csv_of([(n // 3 + 1, f"P{n // 3 + 1}", urls[n : n + 3]) for n in range(0, IMAGE_COUNT, 3)])


def wait_progress(service, request_id, at_least, timeout=60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = service.get(f"/status/{request_id}", params={"limit": 1000}).json()
        done = body["progress"]["processed_images"] + body["progress"]["failed_images"]
        if done >= at_least or body["status"] in FINISHED:
            return body
        time.sleep(0.05)
    raise AssertionError(f"no progress to {at_least}: {body['progress']}")


def assert_complete_and_fetchable(service, body, media_root):
    assert body["status"] == "completed", body["progress"]
    outputs = [url for product in body["products"] for url in product["output_image_urls"]]
    assert len(outputs) == IMAGE_COUNT == len(set(outputs))
    for url in outputs:
        assert service.http.get(url, timeout=10).status_code == 200
    assert len(list(media_root.glob("*/*.jpg"))) == IMAGE_COUNT  # outputs; thumbnails are in */thumbs/
    assert not list((media_root / ".incoming").glob("*.part"))


def test_sigkill_mid_batch_then_restart_completes_everything(
    service_env, tmp_path, image_server, webhook_receiver
):
    hook = webhook_receiver.new_url()
    service = ServiceProcess(service_env, tmp_path / "service.log").start()
    try:
        accepted = service.post(
            "/upload", files={"file": ("p.csv", slow_batch(image_server))}, data={"webhook_url": hook}
        )
        assert accepted.status_code == 202
        request_id = accepted.json()["request_id"]
        before = wait_progress(service, request_id, IMAGE_COUNT // 3)
        assert before["status"] == "processing"
        service.kill()

        service.start()
        body = wait_progress(service, request_id, IMAGE_COUNT)
        assert_complete_and_fetchable(service, body, tmp_path / "media")

        webhook_receiver.wait_for(hook, 1)
        # Handled: the service has recorded the delivery. The finish that creates an event
        # is one transaction, so a second finish would show as a second event row.
        deadline = time.monotonic() + 15
        while (webhook := service.get(f"/status/{request_id}").json()["webhook"])["state"] != "delivered":
            assert time.monotonic() < deadline, webhook
            time.sleep(0.05)
        engine = build_engine(service_env["DATABASE_URL"])
        with engine.connect() as connection:
            events = connection.scalars(
                select(WebhookEvent.webhook_id)
                .join(ProcessingRequest, ProcessingRequest.id == WebhookEvent.request_pk)
                .where(ProcessingRequest.request_id == request_id)
            ).all()
        engine.dispose()
        received = webhook_receiver.received(hook)
        assert events == [webhook["webhook_id"]]
        assert {r.headers["webhook-id"] for r in received} == set(events)
        assert Webhook(SECRET).verify(received[0].body, received[0].headers)["status"] == "completed"
    finally:
        service.stop()


def test_sigterm_finishes_in_flight_work_and_hands_back_the_rest(
    service_env, database_url, tmp_path, image_server
):
    service = ServiceProcess(service_env, tmp_path / "service.log").start()
    try:
        request_id = service.post("/upload", files={"file": ("p.csv", slow_batch(image_server))}).json()[
            "request_id"
        ]
        wait_progress(service, request_id, 10)
        started = time.monotonic()
        # uvicorn shuts down gracefully, then re-raises the signal it caught.
        assert service.terminate() in (0, -signal.SIGTERM)
        # Bounded by SHUTDOWN_GRACE_SECONDS (10 s), with 10 s more for a busy machine to end
        # the process: a shutdown that waited past the grace would show here.
        assert time.monotonic() - started < 10 + 10
        assert b"Application shutdown complete" in (tmp_path / "service.log").read_bytes()

        engine = build_engine(database_url)
        with engine.connect() as connection:
            left_claimed = connection.scalar(
                select(func.count()).select_from(Image).where(Image.status == ImageStatus.PROCESSING)
            )
        engine.dispose()
        assert left_claimed == 0

        service.start()
        body = wait_progress(service, request_id, IMAGE_COUNT)
        assert_complete_and_fetchable(service, body, tmp_path / "media")
    finally:
        service.stop()


def test_with_decoding_in_the_web_process_an_image_that_keeps_killing_it_fails_alone(
    service_env, database_url, tmp_path, image_server
):
    poisonous = image_server.add(images.slow_to_decode())
    quick = image_server.add(images.jpeg())
    notes = tmp_path / "media" / NOTES_DIR_NAME
    service = ServiceProcess({**service_env, "IMAGE_PROCESSES": "0"}, tmp_path / "service.log").start()
    try:
        batch = csv_of([(1, "A", [poisonous, quick])])
        request_id = service.post("/upload", files={"file": ("p.csv", batch)}).json()["request_id"]
        engine = build_engine(database_url)
        with engine.connect() as connection:
            poisonous_id = connection.scalar(select(Image.id).where(Image.input_url == poisonous))
        engine.dispose()
        for _crash in range(3):  # the decoder takes the whole service down, as a crash would
            deadline = time.monotonic() + 30
            while not any(image_id == poisonous_id for image_id, _ in read_notes(notes)):
                assert time.monotonic() < deadline, "the image was never decoded"
                time.sleep(0.001)
            service.kill()
            service.start()
        body = wait_progress(service, request_id, 2)
    finally:
        service.stop()
    assert body["status"] == "completed_with_errors"
    bad, good = body["products"][0]["images"]
    assert (bad["status"], bad["error"]["code"], good["status"]) == ("failed", "worker_crashed", "succeeded")
    assert image_server.hits_for(poisonous) == 3
