"""Cancelling, deleting and retention, through the real app and runner."""

import csv
import io
import json
import threading
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.db.models import (
    IdempotencyKey,
    Image,
    ProcessingRequest,
    Product,
    RequestStatus,
    WebhookDelivery,
    WebhookEvent,
)
from app.db.session import build_engine
from app.main import create_app
from app.services.lifecycle import CANCEL_BATCH_IMAGES, purge_expired
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.servers import send


def gated_image(gate: threading.Event, body: bytes):
    """A handler that answers only once the gate opens (at most 10 s)."""

    def handler(request):
        gate.wait(10)
        send(request, 200, body, {"Content-Type": "image/jpeg"})

    return handler


def wait_until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def rows_of(database_url: str, request_pk: int) -> dict[str, int]:
    engine = build_engine(database_url)
    try:
        with engine.connect() as connection:
            events = select(WebhookEvent.id).where(WebhookEvent.request_pk == request_pk)
            counts = {
                "requests": connection.scalar(select(func.count()).where(ProcessingRequest.id == request_pk)),
                "products": connection.scalar(select(func.count()).where(Product.request_pk == request_pk)),
                "images": connection.scalar(select(func.count()).where(Image.request_pk == request_pk)),
                "webhook_events": connection.scalar(
                    select(func.count()).where(WebhookEvent.request_pk == request_pk)
                ),
                "webhook_deliveries": connection.scalar(
                    select(func.count()).where(WebhookDelivery.event_id.in_(events))
                ),
                "idempotency_keys": connection.scalar(
                    select(func.count()).where(IdempotencyKey.request_pk == request_pk)
                ),
            }
    finally:
        engine.dispose()
    return counts


def request_pk_of(database_url: str, request_id: str) -> int:
    engine = build_engine(database_url)
    try:
        with engine.connect() as connection:
            return connection.scalar(
                select(ProcessingRequest.id).where(ProcessingRequest.request_id == request_id)
            )
    finally:
        engine.dispose()


def finish_a_later_request(client, image_server, webhook_url: str | None = None) -> None:
    """Upload one image and wait until its request has finished: the positive sign that
    the runner has handed out whatever it held before."""
    request_id = upload(client, csv_of([(1, "Later", [image_server.add(images.jpeg((8, 8)))])]), webhook_url)
    assert wait_finished(client, request_id.json()["request_id"])["status"] == "completed"


# -- cancel ----------------------------------------------------------------------------


def test_cancel_during_a_slow_batch_fetches_nothing_more(make_settings, image_server, webhook_receiver):
    settings = make_settings(worker_concurrency=2)
    gate = threading.Event()
    body = images.jpeg((64, 48))
    urls = [image_server.add_handler(gated_image(gate, body), ".jpg") for _ in range(20)]
    hook = webhook_receiver.new_url()

    def fetched() -> int:
        return sum(image_server.hits_for(url) for url in urls)

    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "P1", urls[:10]), (2, "P2", urls[10:])]), hook).json()[
            "request_id"
        ]
        wait_until(lambda: fetched() == 2)  # both workers are inside a download
        try:
            cancelled = client.post(f"/requests/{request_id}/cancel")
            assert cancelled.status_code == 202
            assert cancelled.json()["status"] == "cancelling"  # two images are in flight
            assert cancelled.json()["cancel_requested_at"] is not None
        finally:
            gate.set()
        status = wait_finished(client, request_id)
        # Any unit the runner held back would go out before a later request's.
        finish_a_later_request(client, image_server)
        assert fetched() == 2

        assert status["status"] == "cancelled"
        assert status["progress"]["processed_images"] == 2
        assert status["progress"]["cancelled_images"] == 18
        assert status["progress"]["failed_images"] == 0
        statuses = [image["status"] for product in status["products"] for image in product["images"]]
        assert sorted(set(statuses)) == ["cancelled", "succeeded"]

        (delivery,) = webhook_receiver.wait_for(hook)
        payload = json.loads(delivery.body)
        assert payload["status"] == "cancelled" and payload["cancelled_images"] == 18

        download = client.get(f"/download/{request_id}")
        assert download.status_code == 200
        outputs = [line[3] for line in list(csv.reader(io.StringIO(download.text)))[1:]]
        assert sum(len([url for url in cell.split(",") if url]) for cell in outputs) == 2

        again = client.post(f"/requests/{request_id}/cancel")  # idempotent
        assert again.status_code == 202 and again.json()["status"] == "cancelled"
        # An event would be created with the answer; one sent would go before a later one.
        assert (
            rows_of(settings.database_url, request_pk_of(settings.database_url, request_id))["webhook_events"]
            == 1
        )
        later_hook = webhook_receiver.new_url()
        finish_a_later_request(client, image_server, later_hook)
        assert webhook_receiver.wait_for(later_hook) and len(webhook_receiver.received(hook)) == 1


def test_cancel_with_urls_shared_between_rows_still_finishes_the_request(make_settings, image_server):
    """Rows naming the same URL take their source's result; cancelling must end them too,
    whether their source was in flight (it finishes, they are cancelled) or pending."""
    settings = make_settings(worker_concurrency=1)
    gate = threading.Event()
    body = images.jpeg((64, 48))
    in_flight, waiting = (image_server.add_handler(gated_image(gate, body), ".jpg") for _ in range(2))
    rows = [(n + 1, f"P{n}", [in_flight, waiting]) for n in range(5)]
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of(rows)).json()["request_id"]
        wait_until(lambda: image_server.hits_for(in_flight) == 1)
        try:
            assert client.post(f"/requests/{request_id}/cancel").status_code == 202
        finally:
            gate.set()
        status = wait_finished(client, request_id)
    assert status["status"] == "cancelled"
    assert status["progress"]["processed_images"] == 1  # the source in flight finished
    assert status["progress"]["cancelled_images"] == 9  # its 4 copies, the other URL's 5 rows
    assert image_server.hits_for(waiting) == 0


def test_cancelling_a_request_nothing_of_which_is_in_flight_finishes_it_at_once(
    make_settings, image_server, database_url
):
    with TestClient(create_app(make_settings())) as client:
        client.app.state.runner.stop()  # nothing is claimed
        hook = "http://127.0.0.1:9/hook"
        request_id = upload(client, csv_of([(1, "P", [image_server.add(images.jpeg())] * 3)]), hook).json()[
            "request_id"
        ]
        cancelled = client.post(f"/requests/{request_id}/cancel")
        assert cancelled.status_code == 202
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["progress"]["cancelled_images"] == 3
        assert client.post(f"/requests/{request_id}/cancel").status_code == 202
        assert rows_of(database_url, request_pk_of(database_url, request_id))["webhook_events"] == 1


def test_cancelling_a_finished_request_is_a_conflict(client, image_server):
    request_id = upload(client, csv_of([(1, "P", [image_server.add(images.jpeg())])])).json()["request_id"]
    assert wait_finished(client, request_id)["status"] == "completed"
    refused = client.post(f"/requests/{request_id}/cancel")
    assert refused.status_code == 409
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["request_status"] == "completed"
    assert client.get(f"/status/{request_id}").json()["status"] == "completed"


def test_cancelled_is_a_status_in_the_openapi_schema(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "cancelled" in schemas["RequestStatus"]["enum"]
    assert "cancelled" in schemas["ImageStatus"]["enum"]


# -- delete ----------------------------------------------------------------------------


def test_delete_removes_rows_files_and_webhook_log(
    make_settings, image_server, webhook_receiver, database_url
):
    settings = make_settings()
    hook = webhook_receiver.new_url()
    with TestClient(create_app(settings)) as client:
        response = upload(
            client,
            csv_of([(1, "P", [image_server.add(images.jpeg()) for _ in range(3)])]),
            hook,
            headers={"Idempotency-Key": "delete-me"},
        )
        request_id = response.json()["request_id"]
        status = wait_finished(client, request_id)
        webhook_receiver.wait_for(hook)
        wait_until(lambda: client.get(f"/requests/{request_id}/webhook-deliveries").json()["deliveries"])
        request_pk = request_pk_of(database_url, request_id)
        before = rows_of(database_url, request_pk)
        assert all(before.values()), before
        output_url = status["products"][0]["output_image_urls"][0].removeprefix("http://testserver")
        assert client.get(output_url).status_code == 200
        assert (settings.media_root / request_id).is_dir()

        assert client.delete(f"/requests/{request_id}").status_code == 204

        assert not any(rows_of(database_url, request_pk).values())
        assert not (settings.media_root / request_id).exists()
        for path in (
            f"/status/{request_id}",
            f"/download/{request_id}",
            f"/requests/{request_id}/webhook-deliveries",
            output_url,
        ):
            assert client.get(path).status_code == 404, path
        assert client.delete(f"/requests/{request_id}").status_code == 404
        # The idempotency key went with it: the same upload is a new request.
        replay = upload(
            client,
            csv_of([(1, "P", [image_server.add(images.jpeg()) for _ in range(3)])]),
            hook,
            headers={"Idempotency-Key": "delete-me"},
        )
        assert replay.json()["request_id"] != request_id


def test_a_running_request_cannot_be_deleted(make_settings, image_server):
    gate = threading.Event()
    url = image_server.add_handler(gated_image(gate, images.jpeg()), ".jpg")
    with TestClient(create_app(make_settings())) as client:
        request_id = upload(client, csv_of([(1, "P", [url])])).json()["request_id"]
        try:
            refused = client.delete(f"/requests/{request_id}")
            assert refused.status_code == 409
            assert refused.headers["content-type"] == "application/problem+json"
        finally:
            gate.set()
        wait_finished(client, request_id)
        assert client.delete(f"/requests/{request_id}").status_code == 204


def test_only_the_owning_key_deletes(make_settings, image_server):
    settings = make_settings(api_keys="key-a,key-b")
    with TestClient(create_app(settings)) as client:
        owner, other = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
        request_id = upload(
            client, csv_of([(1, "P", [image_server.add(images.jpeg())])]), headers=owner
        ).json()["request_id"]
        wait_finished(client, request_id, headers=owner)
        assert client.delete(f"/requests/{request_id}").status_code == 401
        assert client.delete(f"/requests/{request_id}", headers=other).status_code == 404
        assert client.delete(f"/requests/{request_id}", headers=owner).status_code == 204


@pytest.mark.slow
def test_delete_removes_the_objects_with_the_s3_backend(
    make_settings,
    image_server,
    aws_environment,
    moto_server,
    bucket,
    s3_admin,
):
    settings = make_settings(
        storage_backend="s3",
        s3_bucket=bucket,
        s3_endpoint_url=moto_server.endpoint_url,
        s3_region="us-east-1",
    )

    def objects(prefix: str) -> list[str]:
        listed = s3_admin.list_objects_v2(Bucket=bucket, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", [])]

    with TestClient(create_app(settings)) as client:
        kept = upload(client, csv_of([(1, "P", [image_server.add(images.jpeg())])])).json()["request_id"]
        doomed = upload(
            client, csv_of([(1, "P", [image_server.add(images.jpeg()) for _ in range(3)])])
        ).json()["request_id"]
        wait_finished(client, kept)
        wait_finished(client, doomed)
        assert len(objects(f"{doomed}/")) == 3 + 3  # outputs and their thumbnails
        assert client.delete(f"/requests/{doomed}").status_code == 204
        assert objects(f"{doomed}/") == []
        assert len(objects(f"{kept}/")) == 1 + 1


# -- retention -------------------------------------------------------------------------


def test_retention_deletes_old_finished_requests_and_leaves_running_ones(make_settings, image_server):
    gate = threading.Event()
    settings = make_settings(retention_days=0.5 / 86400, retention_interval_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        finished = upload(client, csv_of([(1, "P", [image_server.add(images.jpeg())])])).json()["request_id"]
        wait_finished(client, finished)
        running = upload(
            client, csv_of([(1, "P", [image_server.add_handler(gated_image(gate, images.jpeg()), ".jpg")])])
        ).json()["request_id"]
        try:
            wait_until(lambda: client.get(f"/status/{finished}").status_code == 404)
            assert not (settings.media_root / finished).exists()
            time.sleep(1.0)  # the running request is older than the retention by now
            assert client.get(f"/status/{running}").json()["status"] == "processing"
        finally:
            gate.set()
        wait_finished(client, running)


def test_retention_of_zero_keeps_everything_and_purges_expired_keys(
    make_settings, image_server, database_url
):
    settings = make_settings(
        retention_days=0, retention_interval_seconds=0.2, idempotency_key_ttl_seconds=0.1
    )
    with TestClient(create_app(settings)) as client:
        request_id = upload(
            client, csv_of([(1, "P", [image_server.add(images.jpeg())])]), headers={"Idempotency-Key": "k"}
        ).json()["request_id"]
        wait_finished(client, request_id)
        request_pk = request_pk_of(database_url, request_id)
        wait_until(lambda: rows_of(database_url, request_pk)["idempotency_keys"] == 0)
        assert client.get(f"/status/{request_id}").status_code == 200


# -- large requests ----------------------------------------------------------------------


def test_a_large_request_is_cancelled_and_deleted_in_batches_after_a_quick_answer(
    make_settings, image_server, database_url
):
    """The cancel cancels its first CANCEL_BATCH_IMAGES images and answers `cancelling`;
    the rest go in batches after the answer. A DELETE of more than DELETE_CHUNK_ROWS rows
    answers 202 `deleting`, and the request is gone once the background is done."""
    gate = threading.Event()
    gated = image_server.add_handler(gated_image(gate, images.jpeg((8, 8))), ".jpg")
    rows = [(n, f"P{n}", [f"{gated}?n={n}&k={k}" for k in range(3)]) for n in range(1, 4001)]
    with TestClient(create_app(make_settings(worker_concurrency=2))) as client:
        request_id = upload(client, csv_of(rows)).json()["request_id"]
        wait_until(lambda: image_server.hits_for(gated) >= 1)
        try:
            cancelled = client.post(f"/requests/{request_id}/cancel")
        finally:
            gate.set()
        assert cancelled.status_code == 202
        assert cancelled.json()["status"] == "cancelling"
        assert cancelled.json()["progress"]["cancelled_images"] == CANCEL_BATCH_IMAGES
        status = wait_finished(client, request_id)
        assert status["status"] == "cancelled"
        progress = status["progress"]
        assert progress["cancelled_images"] + progress["processed_images"] == 12_000
        assert progress["processed_images"] <= 4  # the images in flight at the cancel

        request_pk = request_pk_of(database_url, request_id)
        deleting = client.delete(f"/requests/{request_id}")
        assert deleting.status_code == 202
        assert deleting.json()["status"] == "deleting"
        wait_until(lambda: client.get(f"/status/{request_id}").status_code == 404)
    assert not any(rows_of(database_url, request_pk).values())


def test_a_sweep_finishes_a_delete_or_a_cancel_a_restart_interrupted(
    make_settings, image_server, database_url
):
    """Requests left `deleting` or `cancelling` (the process stopped before its
    background work was done) are finished by the next retention sweep."""
    with TestClient(create_app(make_settings(worker_concurrency=1))) as client:
        finished = upload(client, csv_of([(1, "P", [image_server.add(images.jpeg((8, 8)))])])).json()
        wait_finished(client, finished["request_id"])
        gate = threading.Event()
        gated = image_server.add_handler(gated_image(gate, images.jpeg((8, 8))), ".jpg")
        running = upload(client, csv_of([(n, "P", [f"{gated}?n={n}"]) for n in range(1, 51)])).json()
        wait_until(lambda: image_server.hits_for(gated) >= 1)
        engine = build_engine(database_url)
        with engine.begin() as connection:
            connection.execute(
                update(ProcessingRequest)
                .where(ProcessingRequest.request_id == finished["request_id"])
                .values(status=RequestStatus.DELETING)
            )
            connection.execute(
                update(ProcessingRequest)
                .where(ProcessingRequest.request_id == running["request_id"])
                .values(status=RequestStatus.CANCELLING, cancelled_at=func.now())
            )
        engine.dispose()
        # Its rows go in chunks: its CSV would be cut short.
        download = client.get(f"/download/{finished['request_id']}")
        assert download.status_code == 409 and download.json()["request_status"] == "deleting"
        app = client.app
        try:
            purge_expired(
                app.state.writer_sessions, app.state.storage, retention_days=0, ledger=app.state.ledger
            )
        finally:
            gate.set()
        assert client.get(f"/status/{finished['request_id']}").status_code == 404
        status = wait_finished(client, running["request_id"])
        assert status["status"] == "cancelled"
        progress = status["progress"]
        assert progress["cancelled_images"] + progress["processed_images"] == 50
        assert progress["cancelled_images"] >= 40  # all but those the runner held
