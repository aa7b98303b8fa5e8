"""Idempotency-Key on uploads."""

import pytest

from tests.conftest import csv_of, upload, wait_finished
from tests.support import images


def test_same_key_and_file_returns_the_original_and_creates_nothing(client, image_server):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    first = upload(client, data, headers={"Idempotency-Key": "order-42"})
    again = upload(client, data, headers={"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 202
    # The same answer, but for the status, which is the request's status now.
    assert {**again.json(), "status": first.json()["status"]} == first.json()
    assert again.json()["status"] in ("pending", "processing", "completed")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == first.headers["location"]
    assert len(client.get("/requests").json()["items"]) == 1
    wait_finished(client, first.json()["request_id"])


def test_a_replay_reports_the_status_of_the_request_now(client, image_server):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    first = upload(client, data, headers={"Idempotency-Key": "order-43"})
    assert first.json()["status"] == "pending"
    wait_finished(client, first.json()["request_id"])
    again = upload(client, data, headers={"Idempotency-Key": "order-43"})
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["status"] == "completed"


def test_same_key_with_a_different_file_is_refused(client, image_server):
    url = image_server.add(images.jpeg())
    assert upload(client, csv_of([(1, "A", [url])]), headers={"Idempotency-Key": "k"}).status_code == 202
    other = upload(client, csv_of([(1, "B", [url])]), headers={"Idempotency-Key": "k"})
    assert other.status_code == 422
    assert other.headers["content-type"] == "application/problem+json"
    assert other.json()["detail"] == (
        "this Idempotency-Key was used for a different upload; use a new key for new content"
    )
    assert len(client.get("/requests").json()["items"]) == 1


def test_same_key_with_a_different_webhook_is_refused(client, image_server):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    upload(client, data, webhook_url="https://a.example/hook", headers={"Idempotency-Key": "w"})
    other = upload(client, data, webhook_url="https://b.example/hook", headers={"Idempotency-Key": "w"})
    assert other.status_code == 422


def test_different_keys_create_different_requests(client, image_server):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    first = upload(client, data, headers={"Idempotency-Key": "one"}).json()["request_id"]
    second = upload(client, data, headers={"Idempotency-Key": "two"}).json()["request_id"]
    assert first != second


def test_expired_keys_are_forgotten(make_settings, image_server):
    import time

    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(idempotency_key_ttl_seconds=0.2))) as client:
        data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
        first = upload(client, data, headers={"Idempotency-Key": "short"}).json()["request_id"]
        time.sleep(0.3)
        second = upload(client, data, headers={"Idempotency-Key": "short"}).json()["request_id"]
        assert first != second


def test_a_refused_csv_does_not_use_up_the_key(client, image_server):
    bad = b"S. No.,Product Name,Input Image Urls\n1,A,not-a-url\n"
    assert upload(client, bad, headers={"Idempotency-Key": "retry-me"}).status_code == 422
    good = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    assert upload(client, good, headers={"Idempotency-Key": "retry-me"}).status_code == 202


def test_expired_keys_are_cleared_by_later_keyed_uploads(make_settings, image_server, database_url):
    import time

    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from app.db.models import IdempotencyKey
    from app.db.session import build_engine
    from app.main import create_app

    with TestClient(create_app(make_settings(idempotency_key_ttl_seconds=0.2))) as client:
        data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
        for key in ("a", "b", "c"):
            upload(client, data, headers={"Idempotency-Key": key})
        time.sleep(0.3)
        upload(client, data, headers={"Idempotency-Key": "d"})
    engine = build_engine(database_url)
    with engine.connect() as connection:
        keys = connection.scalars(select(IdempotencyKey.key)).all()
    engine.dispose()
    assert keys == ["d"]


def test_a_key_is_scoped_to_the_api_key_that_used_it(make_settings, image_server):
    from fastapi.testclient import TestClient

    from app.main import create_app

    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    with TestClient(create_app(make_settings(api_keys="key-one,key-two"))) as client:
        one = {"X-API-Key": "key-one", "Idempotency-Key": "order-7"}
        two = {"X-API-Key": "key-two", "Idempotency-Key": "order-7"}
        mine = upload(client, data, headers=one)
        theirs = upload(client, data, headers=two)
        assert mine.status_code == theirs.status_code == 202
        assert "idempotent-replayed" not in theirs.headers
        assert theirs.json()["request_id"] != mine.json()["request_id"]
        replay = upload(client, data, headers=two)
        assert replay.headers["idempotent-replayed"] == "true"
        assert replay.json()["request_id"] == theirs.json()["request_id"]
        for request_id, headers in ((mine.json()["request_id"], one), (theirs.json()["request_id"], two)):
            wait_finished(client, request_id, headers={"X-API-Key": headers["X-API-Key"]})


def test_same_key_with_other_output_options_is_refused(client, image_server):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    first = client.post(
        "/upload",
        files={"file": ("products.csv", data, "text/csv")},
        data={"quality": "80"},
        headers={"Idempotency-Key": "opts"},
    )
    assert first.status_code == 202
    for other in ({"quality": "81"}, {"quality": "80", "format": "webp"}, {}):
        again = client.post(
            "/upload",
            files={"file": ("products.csv", data, "text/csv")},
            data=other,
            headers={"Idempotency-Key": "opts"},
        )
        assert again.status_code == 422, (other, again.text)
        assert again.headers["content-type"] == "application/problem+json"
    assert len(client.get("/requests").json()["items"]) == 1
    wait_finished(client, first.json()["request_id"])


def test_a_key_whose_first_request_is_being_created_answers_409(client, image_server, monkeypatch):
    """The second upload read the keys before the first one's commit (find_original found
    nothing), and meets its key when it inserts its own."""
    from app.api.routes import upload as upload_route

    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    first = upload(client, data, headers={"Idempotency-Key": "racing"})
    assert first.status_code == 202
    monkeypatch.setattr(upload_route, "find_original", lambda *args: None)
    second = upload(client, data, headers={"Idempotency-Key": "racing"})
    assert second.status_code == 409, second.text
    assert second.headers["content-type"] == "application/problem+json"
    assert second.headers["retry-after"] == "1"
    assert second.json()["detail"] == (
        "an upload with this Idempotency-Key is being processed; retry in a moment"
    )
    assert [item["request_id"] for item in client.get("/requests").json()["items"]] == [
        first.json()["request_id"]
    ]
    wait_finished(client, first.json()["request_id"])


@pytest.mark.parametrize("key", ["", "   ", "k" * 256, "tab\there", "new\nline"])
def test_a_key_that_is_empty_too_long_or_not_printable_is_refused(client, image_server, key):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    response = upload(client, data, headers={"Idempotency-Key": key})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "Idempotency-Key must be 1 to 255 printable characters"
    assert client.get("/requests").json()["items"] == []


def test_a_key_of_255_printable_characters_is_accepted(client, image_server):
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    response = upload(client, data, headers={"Idempotency-Key": " " + "k" * 255 + " "})
    assert response.status_code == 202, response.text
    wait_finished(client, response.json()["request_id"])


@pytest.mark.parametrize("api_keys", ["key-one", ""], ids=["an API key", "no API keys"])
def test_an_expired_key_is_reusable_however_many_other_keys_have_expired(
    make_settings, image_server, database_url, api_keys
):
    """Expired keys are cleared 100 at a time; the caller's own expired key is cleared
    whatever the batch reaches, and the key stored for the new request is the caller's,
    with an API key or without API keys."""
    import time
    from datetime import timedelta

    from fastapi.testclient import TestClient
    from sqlalchemy import func, insert, select

    from app.db.base import utcnow
    from app.db.models import IdempotencyKey, ProcessingRequest
    from app.db.session import build_engine
    from app.main import create_app

    engine = build_engine(database_url)
    data = csv_of([(1, "A", [image_server.add(images.jpeg())])])
    settings = make_settings(api_keys=api_keys, idempotency_key_ttl_seconds=0.5)
    api_key = {"X-API-Key": api_keys} if api_keys else {}
    with TestClient(create_app(settings)) as client:
        unkeyed = upload(client, data, headers=api_key).json()["request_id"]
        wait_finished(client, unkeyed, headers=api_key)
        with engine.begin() as connection:
            request_pk = connection.scalar(
                select(ProcessingRequest.id).where(ProcessingRequest.request_id == unkeyed)
            )
            long_ago = utcnow() - timedelta(hours=1)
            connection.execute(
                insert(IdempotencyKey),
                [
                    {
                        "owner_scope": "another-owner",
                        "key": f"old-{n}",
                        "fingerprint": "0" * 64,
                        "request_pk": request_pk,
                        "created_at": long_ago,
                        "expires_at": long_ago,
                    }
                    for n in range(250)
                ],
            )
        headers = {**api_key, "Idempotency-Key": "order-8"}
        first = upload(client, data, headers=headers)
        assert first.status_code == 202
        time.sleep(0.6)
        # 150 other expired keys are older than this one's, so a batch of 100 misses it.
        second = upload(client, data, headers=headers)
        assert second.status_code == 202, second.text
        assert "idempotent-replayed" not in second.headers
        assert second.json()["request_id"] != first.json()["request_id"]
        for response in (first, second):
            wait_finished(client, response.json()["request_id"], headers=api_key)
    with engine.connect() as connection:
        kept = connection.execute(
            select(IdempotencyKey.owner_scope, IdempotencyKey.key, ProcessingRequest.request_id)
            .join(ProcessingRequest, ProcessingRequest.id == IdempotencyKey.request_pk)
            .where(IdempotencyKey.owner_scope != "another-owner")
        ).all()
        owner = connection.scalar(
            select(ProcessingRequest.owner).where(ProcessingRequest.request_id == unkeyed)
        )
        others_left = connection.scalar(
            select(func.count()).where(IdempotencyKey.owner_scope == "another-owner")
        )
    engine.dispose()
    assert bool(owner) == bool(api_keys)
    assert [tuple(row) for row in kept] == [(owner or "", "order-8", second.json()["request_id"])]
    assert others_left == 50  # two keyed uploads, 100 cleared by each
