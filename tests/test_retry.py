"""Retrying the failed images of a finished request, through the real app and runner."""

import csv
import io
import json
import threading

from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import Image, ProcessingRequest, WebhookEvent
from app.db.session import build_engine
from app.main import create_app
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.servers import UnpublishedImage, send


def gated_image(gate: threading.Event, body: bytes):
    def handler(request):
        gate.wait(10)
        send(request, 200, body, {"Content-Type": "image/jpeg"})

    return handler


def output_cells(client: TestClient, request_id: str) -> list[list[str]]:
    download = client.get(f"/download/{request_id}")
    assert download.status_code == 200
    lines = list(csv.reader(io.StringIO(download.text)))[1:]
    return [[url for url in line[3].split(",") if url] for line in lines]


def image_rows(database_url: str, request_id: str) -> list[tuple[str, str | None]]:
    engine = build_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                select(Image.status, Image.error_code)
                .join(ProcessingRequest, ProcessingRequest.id == Image.request_pk)
                .where(ProcessingRequest.request_id == request_id)
                .order_by(Image.id)
            )
            return [tuple(row) for row in rows]
    finally:
        engine.dispose()


def webhook_events(database_url: str, request_id: str) -> int:
    """The request's webhook events: each is created in the transaction that finishes it."""
    engine = build_engine(database_url)
    try:
        with engine.connect() as connection:
            return len(
                connection.scalars(
                    select(WebhookEvent.id)
                    .join(ProcessingRequest, ProcessingRequest.id == WebhookEvent.request_pk)
                    .where(ProcessingRequest.request_id == request_id)
                ).all()
            )
    finally:
        engine.dispose()


def deliver_a_later_webhook(client, image_server, webhook_receiver) -> None:
    """A later request finished and its webhook received: one due before it went first."""
    later = webhook_receiver.new_url()
    request_id = upload(client, csv_of([(1, "Later", [image_server.add(images.jpeg((8, 8)))])]), later)
    assert wait_finished(client, request_id.json()["request_id"])["status"] == "completed"
    webhook_receiver.wait_for(later)


def test_a_404_image_published_later_is_retried_and_the_request_completes_again(
    make_settings, image_server, webhook_receiver, database_url
):
    unpublished = UnpublishedImage(images.jpeg((80, 60)))
    late = image_server.add_handler(unpublished, ".jpg")
    good = image_server.add(images.jpeg((64, 48)), suffix=".jpg")
    hook = webhook_receiver.new_url()
    # Row 2 names the late URL again: a copy, which must follow its source.
    rows = [(1, "Late", [late]), (2, "Late again", [good, late])]
    with TestClient(create_app(make_settings())) as client:
        request_id = upload(client, csv_of(rows), hook).json()["request_id"]
        first = wait_finished(client, request_id)
        assert first["status"] == "completed_with_errors"
        assert (first["progress"]["processed_images"], first["progress"]["failed_images"]) == (1, 2)
        (first_hook,) = webhook_receiver.wait_for(hook)
        assert output_cells(client, request_id) == [[], [first["products"][1]["output_image_urls"][0]]]

        unpublished.published.set()
        retried = client.post(f"/requests/{request_id}/retry")
        assert retried.status_code == 202
        assert retried.json()["status"] == "processing"
        assert retried.json()["retried_images"] == 2
        assert retried.json()["completed_at"] is None and retried.json()["download_url"] is None
        assert retried.json()["progress"]["failed_images"] == 0
        assert retried.json()["progress"]["processed_images"] == 1

        second = wait_finished(client, request_id)
        assert second["status"] == "completed"
        assert second["progress"]["processed_images"] == 3
        assert second["progress"]["failed_images"] == 0
        assert image_server.hits_for(late) == 2  # once a try: the copy was not fetched
        assert [status for status, _ in image_rows(database_url, request_id)] == ["succeeded"] * 3

        received = webhook_receiver.wait_for(hook, count=2)
        assert len(received) == 2
        assert received[1].headers["webhook-id"] != first_hook.headers["webhook-id"]
        payload = json.loads(received[1].body)
        assert payload["status"] == "completed"
        assert (payload["processed_images"], payload["failed_images"]) == (3, 0)

        cells = output_cells(client, request_id)
        assert len(cells[0]) == 1 and len(cells[1]) == 2
        assert cells[0][0] == cells[1][1]  # the copy shares its source's output
        for url in cells[0] + cells[1]:
            assert client.get(url.removeprefix("http://testserver")).status_code == 200

        # Nothing failed any more: 202, and nothing changes, no webhook.
        again = client.post(f"/requests/{request_id}/retry")
        assert again.status_code == 202
        assert again.json()["status"] == "completed" and again.json()["retried_images"] == 0
        assert webhook_events(database_url, request_id) == 2
        deliver_a_later_webhook(client, image_server, webhook_receiver)
        assert len(webhook_receiver.received(hook)) == 2


def test_codes_pick_which_failed_images_are_retried(make_settings, image_server, database_url):
    missing = image_server.add(b"gone", content_type="text/plain", status=404, suffix=".jpg")
    web_page = image_server.add(b"<html>not an image</html>", content_type="text/html", suffix=".jpg")
    good = image_server.add(images.jpeg(), suffix=".jpg")
    with TestClient(create_app(make_settings())) as client:
        request_id = upload(client, csv_of([(1, "P", [missing, web_page, good])])).json()["request_id"]
        assert wait_finished(client, request_id)["status"] == "completed_with_errors"

        unknown = client.post(f"/requests/{request_id}/retry?codes=http_404,no_such_code,http_9999")
        assert unknown.status_code == 422
        assert unknown.headers["content-type"] == "application/problem+json"
        assert unknown.json()["unknown_codes"] == ["http_9999", "no_such_code"]
        assert "no_such_code" in unknown.json()["detail"] and "http_9999" in unknown.json()["detail"]
        assert client.get(f"/status/{request_id}").json()["status"] == "completed_with_errors"

        nothing = client.post(f"/requests/{request_id}/retry", data={"codes": "http_410"})
        assert nothing.status_code == 202
        assert nothing.json()["retried_images"] == 0
        assert nothing.json()["status"] == "completed_with_errors"

        retried = client.post(f"/requests/{request_id}/retry", data={"codes": "http_404"})
        assert retried.status_code == 202 and retried.json()["retried_images"] == 1
        assert retried.json()["progress"]["failed_images"] == 1
        status = wait_finished(client, request_id)
        assert status["status"] == "completed_with_errors"
        assert (status["progress"]["processed_images"], status["progress"]["failed_images"]) == (1, 2)
        assert image_server.hits_for(missing) == 2
        assert image_server.hits_for(web_page) == 1
        assert image_rows(database_url, request_id) == [
            ("failed", "http_404"),
            ("failed", "not_an_image"),
            ("succeeded", None),
        ]


def test_a_running_or_cancelled_request_is_not_retried(make_settings, image_server):
    gate = threading.Event()
    slow = image_server.add_handler(gated_image(gate, images.jpeg()), ".jpg")
    with TestClient(create_app(make_settings())) as client:
        running = upload(client, csv_of([(1, "P", [slow])])).json()["request_id"]
        try:
            refused = client.post(f"/requests/{running}/retry")
            assert refused.status_code == 409
            assert refused.headers["content-type"] == "application/problem+json"
            assert refused.json()["request_status"] in ("pending", "processing")
        finally:
            gate.set()
        assert wait_finished(client, running)["status"] == "completed"

        client.app.state.runner.stop()  # nothing is claimed: the cancel ends it at once
        cancelled = upload(client, csv_of([(1, "P", [image_server.add(images.jpeg())])])).json()["request_id"]
        assert client.post(f"/requests/{cancelled}/cancel").json()["status"] == "cancelled"
        refused = client.post(f"/requests/{cancelled}/retry")
        assert refused.status_code == 409 and refused.json()["request_status"] == "cancelled"


def test_only_the_owning_key_retries(make_settings, image_server):
    settings = make_settings(api_keys="key-a,key-b")
    missing = image_server.add(b"gone", content_type="text/plain", status=404, suffix=".jpg")
    with TestClient(create_app(settings)) as client:
        owner, other = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
        request_id = upload(client, csv_of([(1, "P", [missing])]), headers=owner).json()["request_id"]
        assert wait_finished(client, request_id, headers=owner)["status"] == "failed"
        assert client.post(f"/requests/{request_id}/retry").status_code == 401
        assert client.post(f"/requests/{request_id}/retry", headers=other).status_code == 404
        assert image_server.hits_for(missing) == 1
        retried = client.post(f"/requests/{request_id}/retry", headers=owner)
        assert retried.status_code == 202 and retried.json()["retried_images"] == 1
        assert wait_finished(client, request_id, headers=owner)["status"] == "failed"
        assert image_server.hits_for(missing) == 2


def test_retries_at_once_retry_each_image_once_and_finish_once(
    make_settings, image_server, webhook_receiver, database_url
):
    missing = [image_server.add(b"gone", "text/plain", status=404, suffix=".jpg") for _ in range(6)]
    hook = webhook_receiver.new_url()
    with TestClient(create_app(make_settings())) as client:
        rows = [(1, "P", missing), (2, "Q", missing[:3])]  # 3 copies
        request_id = upload(client, csv_of(rows), hook).json()["request_id"]
        assert wait_finished(client, request_id)["status"] == "failed"
        webhook_receiver.wait_for(hook)
        start = threading.Barrier(4)
        answers = []

        def retry():
            start.wait()
            answers.append(client.post(f"/requests/{request_id}/retry"))

        threads = [threading.Thread(target=retry) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(answer.status_code in (202, 409) for answer in answers)
        # Each retry that got in took all 9 rows (a later one may come after the first has
        # finished again); none took a part, and the others found the request running.
        runs = [answer.json()["retried_images"] for answer in answers if answer.status_code == 202]
        assert runs and set(runs) == {9}, [answer.json() for answer in answers]

        status = wait_finished(client, request_id)
        assert status["status"] == "failed"
        assert (status["progress"]["processed_images"], status["progress"]["failed_images"]) == (0, 9)
        assert all(image_server.hits_for(url) == 1 + len(runs) for url in missing)
        assert len(webhook_receiver.wait_for(hook, count=1 + len(runs))) == 1 + len(runs)
        assert webhook_events(database_url, request_id) == 1 + len(runs)
        deliver_a_later_webhook(client, image_server, webhook_receiver)
        assert len(webhook_receiver.received(hook)) == 1 + len(runs)
