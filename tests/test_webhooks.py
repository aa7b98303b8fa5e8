"""Webhook delivery: signed, retried with growing gaps, recorded, redeliverable."""

import itertools
import json
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from standardwebhooks import Webhook

from app.main import create_app
from app.webhooks.delivery import parse_retry_after
from app.webhooks.signing import sign
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.test_api import SECRET


@pytest.fixture
def signed_client(make_settings):
    with TestClient(create_app(make_settings(webhook_secret=SECRET, webhook_max_attempts=4))) as client:
        yield client


@pytest.fixture
def slow_retry_client(make_settings):
    """Retry gaps long enough (0.2 s base) that scheduling noise cannot reorder them."""
    settings = make_settings(webhook_secret=SECRET, webhook_max_attempts=4, webhook_retry_base_seconds=0.2)
    with TestClient(create_app(settings)) as client:
        yield client


def finished_request(client, image_server, hook) -> str:
    request_id = upload(client, csv_of([(1, "A", [image_server.add(images.jpeg())])]), webhook_url=hook)
    request_id = request_id.json()["request_id"]
    wait_finished(client, request_id)
    return request_id


def wait_webhook_state(client, request_id, state, timeout=15):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        webhook = client.get(f"/status/{request_id}").json()["webhook"]
        if webhook["state"] == state:
            return webhook
        time.sleep(0.05)
    raise AssertionError(f"webhook never reached {state}: {webhook}")


def test_a_failing_receiver_gets_retries_with_the_same_id_and_growing_gaps(
    slow_retry_client, image_server, webhook_receiver
):
    signed_client = slow_retry_client
    hook = webhook_receiver.new_url(fail_with=[500, 500])
    request_id = finished_request(signed_client, image_server, hook)
    received = webhook_receiver.wait_for(hook, 3)
    assert len(received) == 3
    assert len({r.headers["webhook-id"] for r in received}) == 1
    for delivery in received:
        assert Webhook(SECRET).verify(delivery.body, delivery.headers)["request_id"] == request_id

    webhook = wait_webhook_state(signed_client, request_id, "delivered")
    assert webhook["attempts"] == 3 and webhook["last_status_code"] == 200
    log = signed_client.get(f"/requests/{request_id}/webhook-deliveries").json()
    assert [d["status_code"] for d in log["deliveries"]] == [500, 500, 200]
    assert [d["attempt"] for d in log["deliveries"]] == [1, 2, 3]
    # The schedule grows: at least 0.2 s and 0.4 s (each less at most 25% jitter).
    times = [datetime.fromisoformat(d["attempted_at"]) for d in log["deliveries"]]
    gaps = [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]
    assert gaps[0] >= 0.15 and gaps[1] >= 0.3, (gaps, log["deliveries"])
    assert log["deliveries"][0]["error"] == "HTTP 500"
    assert log["deliveries"][0]["response_excerpt"] == "try again"


def test_delivery_gives_up_after_the_attempt_limit(signed_client, image_server, webhook_receiver):
    hook = webhook_receiver.new_url(fail_with=[503] * 10)
    request_id = finished_request(signed_client, image_server, hook)
    webhook = wait_webhook_state(signed_client, request_id, "failed")
    assert webhook["attempts"] == 4
    assert len(webhook_receiver.received(hook)) == 4


def test_redeliver_sends_the_same_event_again(signed_client, image_server, webhook_receiver):
    hook = webhook_receiver.new_url()
    request_id = finished_request(signed_client, image_server, hook)
    (first,) = webhook_receiver.wait_for(hook, 1)
    wait_webhook_state(signed_client, request_id, "delivered")
    response = signed_client.post(f"/requests/{request_id}/webhook-deliveries/redeliver")
    assert response.status_code == 202
    received = webhook_receiver.wait_for(hook, 2)
    assert len(received) == 2
    assert received[1].headers["webhook-id"] == first.headers["webhook-id"]
    assert received[1].body == first.body


def test_a_redelivered_event_that_had_failed_gets_a_fresh_attempt_budget(
    signed_client, image_server, webhook_receiver
):
    hook = webhook_receiver.new_url(fail_with=[503] * 7)  # 4 attempts fail, then 3 more
    request_id = finished_request(signed_client, image_server, hook)
    assert wait_webhook_state(signed_client, request_id, "failed")["attempts"] == 4
    response = signed_client.post(f"/requests/{request_id}/webhook-deliveries/redeliver")
    assert response.status_code == 202
    webhook = wait_webhook_state(signed_client, request_id, "delivered")
    assert webhook["attempts"] == 8 and webhook["last_status_code"] == 200
    log = signed_client.get(f"/requests/{request_id}/webhook-deliveries").json()
    assert [d["attempt"] for d in log["deliveries"]] == list(range(1, 9))
    assert [d["status_code"] for d in log["deliveries"]] == [503] * 7 + [200]
    received = webhook_receiver.received(hook)
    assert len(received) == 8 and len({r.headers["webhook-id"] for r in received}) == 1


def test_redeliver_of_an_event_waiting_for_its_next_attempt_sends_it_now(
    make_settings, image_server, webhook_receiver
):
    """The next attempt is 10 minutes away; redelivering makes the event due at once."""
    import time

    settings = make_settings(webhook_secret=SECRET, webhook_max_attempts=4, webhook_retry_base_seconds=600)
    hook = webhook_receiver.new_url(fail_with=[503])
    with TestClient(create_app(settings)) as client:
        request_id = finished_request(client, image_server, hook)
        webhook_receiver.wait_for(hook, 1)
        deadline = time.monotonic() + 10
        while not client.get(f"/status/{request_id}").json()["webhook"]["last_status_code"]:
            assert time.monotonic() < deadline, "the first attempt was never recorded"
            time.sleep(0.05)
        assert client.get(f"/status/{request_id}").json()["webhook"]["state"] == "pending"
        response = client.post(f"/requests/{request_id}/webhook-deliveries/redeliver")
        assert response.status_code == 202
        assert response.json()["webhook"]["state"] == "pending"
        webhook = wait_webhook_state(client, request_id, "delivered", timeout=10)
    assert webhook["attempts"] == 2 and webhook["last_status_code"] == 200
    assert len(webhook_receiver.received(hook)) == 2


def test_redeliver_succeeds_while_a_batch_is_writing(signed_client, image_server, webhook_receiver):
    hook = webhook_receiver.new_url()
    request_id = finished_request(signed_client, image_server, hook)
    wait_webhook_state(signed_client, request_id, "delivered")
    tiny = images.jpeg((8, 8))
    batch = csv_of([(n + 1, f"P{n}", [image_server.add(tiny)]) for n in range(400)])
    running = upload(signed_client, batch).json()["request_id"]
    answers = []
    while signed_client.get(f"/status/{running}").json()["status"] not in ("completed", "failed"):
        response = signed_client.post(f"/requests/{request_id}/webhook-deliveries/redeliver")
        answers.append((response.status_code, response.text))
    assert len(answers) >= 5, "the batch finished before the redeliveries could overlap it"
    assert all(status == 202 for status, _ in answers), [a for a in answers if a[0] != 202][:1]
    assert wait_webhook_state(signed_client, request_id, "delivered")["last_status_code"] == 200


def test_redeliver_without_a_webhook_is_a_409_problem(signed_client, image_server):
    request_id = finished_request(signed_client, image_server, None)
    response = signed_client.post(f"/requests/{request_id}/webhook-deliveries/redeliver")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"


def test_webhook_to_a_blocked_address_fails_without_a_request(make_settings, image_server):
    from tests.support.servers import WebhookReceiver

    with (
        WebhookReceiver() as outside,
        TestClient(create_app(make_settings(webhook_max_attempts=1))) as client,
    ):
        hook = outside.new_url()
        request_id = finished_request(client, image_server, hook)
        webhook = wait_webhook_state(client, request_id, "failed")
        assert webhook["last_error"].startswith("blocked_address")
        assert outside.received(hook) == []


def test_an_image_host_on_the_image_allowlist_is_refused_as_a_webhook_target(
    make_settings, image_server, webhook_receiver
):
    from tests.support.servers import send

    settings = make_settings(
        webhook_max_attempts=1,
        allow_private_hosts=f"127.0.0.1:{image_server.port}",
        webhook_allow_private_hosts=f"127.0.0.1:{webhook_receiver.port}",
    )
    internal_endpoint = image_server.add_handler(lambda request: send(request, 200, b"internal data"))
    with TestClient(create_app(settings)) as client:
        request_id = finished_request(client, image_server, internal_endpoint)
        webhook = wait_webhook_state(client, request_id, "failed")
    assert webhook["last_error"].startswith("blocked_address")
    assert image_server.hits_for(internal_endpoint) == 0


def test_a_webhook_host_on_the_webhook_allowlist_is_refused_as_an_image_source(
    make_settings, image_server, webhook_receiver
):
    settings = make_settings(
        allow_private_hosts=f"127.0.0.1:{image_server.port}",
        webhook_allow_private_hosts=f"127.0.0.1:{webhook_receiver.port}",
    )
    image_on_webhook_host = webhook_receiver.new_url()
    hook = webhook_receiver.new_url()
    with TestClient(create_app(settings)) as client:
        response = upload(client, csv_of([(1, "A", [image_on_webhook_host])]), webhook_url=hook)
        request_id = response.json()["request_id"]
        status = wait_finished(client, request_id)
        wait_webhook_state(client, request_id, "delivered")
    (image,) = status["products"][0]["images"]
    assert image["error"]["code"] == "blocked_address"
    assert webhook_receiver.received(image_on_webhook_host) == []
    assert len(webhook_receiver.received(hook)) == 1


def test_an_attempt_that_cannot_be_made_is_recorded_and_the_event_ends(
    make_settings, image_server, webhook_receiver
):
    # Start-up refuses such a secret; model_copy skips validation, standing in for any
    # fault while an attempt is prepared.
    settings = make_settings(webhook_max_attempts=2).model_copy(update={"webhook_secret": "whsec_abc"})
    hook = webhook_receiver.new_url()
    with TestClient(create_app(settings)) as client:
        request_id = finished_request(client, image_server, hook)
        webhook = wait_webhook_state(client, request_id, "failed")
        log = client.get(f"/requests/{request_id}/webhook-deliveries").json()
    assert webhook["attempts"] == 2 and webhook["last_error"].startswith("internal_error")
    assert [d["attempt"] for d in log["deliveries"]] == [1, 2]
    assert all(
        d["error"].startswith("internal_error") and d["status_code"] is None for d in log["deliveries"]
    )
    assert webhook_receiver.received(hook) == []


def test_signature_matches_the_reference_implementation(signed_client, image_server, webhook_receiver):
    body = b'{"a":1}'
    signature = sign(SECRET, "msg_1", 1_700_000_000, body)
    reference = Webhook(SECRET)
    assert reference.sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body.decode()) == signature

    hook = webhook_receiver.new_url()
    finished_request(signed_client, image_server, hook)
    (delivery,) = webhook_receiver.wait_for(hook, 1)
    sent_at = datetime.fromtimestamp(int(delivery.headers["webhook-timestamp"]), UTC)
    expected = reference.sign(delivery.headers["webhook-id"], sent_at, delivery.body.decode())
    assert delivery.headers["webhook-signature"].startswith("v1,")
    assert delivery.headers["webhook-signature"] == expected


def test_retry_after_is_understood():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("120", now) == timedelta(seconds=120)
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 GMT", now) == timedelta(seconds=60)
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("99999999", now) == timedelta(hours=24)


def test_retry_after_edge_cases():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    # "-0000" names no time zone: the date parses without one and is read as UTC.
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 -0000", now) == timedelta(seconds=60)
    assert parse_retry_after("Thu, 01 Jan 2026 02:01:00 +0200", now) == timedelta(seconds=60)
    assert parse_retry_after(" 120 ", now) == timedelta(seconds=120)
    assert parse_retry_after("Wed, 31 Dec 2025 23:00:00 GMT", now) == timedelta(0)  # already past
    assert parse_retry_after("Sat, 01 Jan 2028 00:00:00 GMT", now) == timedelta(hours=24)
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("-5", now) is None
    assert parse_retry_after("Thu, 32 Jan 2026 00:01:00 GMT", now) is None


def test_a_receiver_down_until_after_a_restart_still_gets_the_event(make_settings, image_server):
    from tests.support.servers import WebhookReceiver
    from tests.support.service_process import free_port

    port = free_port()  # nothing listens here yet: connections are refused
    settings = make_settings(
        webhook_secret=SECRET,
        webhook_retry_base_seconds=0.2,
        webhook_allow_private_hosts=f"127.0.0.1:{port}",
    )
    hook = f"http://127.0.0.1:{port}/hook/down"
    with TestClient(create_app(settings)) as client:
        request_id = finished_request(client, image_server, hook)
        webhook = wait_webhook_state(client, request_id, "pending")
        deadline = __import__("time").monotonic() + 10
        # An attempt counts from its claim; its error is recorded when it has been made.
        while not webhook["last_error"] and __import__("time").monotonic() < deadline:
            webhook = client.get(f"/status/{request_id}").json()["webhook"]
        assert webhook["attempts"] >= 1 and webhook["last_error"].startswith("connection_error")

    with WebhookReceiver(port) as receiver, TestClient(create_app(settings)) as client:
        received = receiver.wait_for(hook, 1)
        assert len(received) == 1
        assert received[0].headers["webhook-id"] == webhook["webhook_id"]
        assert Webhook(SECRET).verify(received[0].body, received[0].headers)["request_id"] == request_id
        wait_webhook_state(client, request_id, "delivered")


def test_backoff_grows_exponentially_within_its_jitter():
    from app.webhooks.delivery import WebhookDeliverer

    deliverer = WebhookDeliverer(
        sessions=None, http=None, secret="", timeout_seconds=1, max_attempts=8, retry_base_seconds=60
    )
    for attempts in range(1, 8):
        nominal = 60 * 2 ** (attempts - 1)
        for _ in range(50):
            wait = deliverer.backoff(attempts).total_seconds()
            assert 0.75 * nominal <= wait <= 1.25 * nominal


def test_a_slow_receiver_does_not_hold_up_other_webhooks(make_settings, image_server, webhook_receiver):
    import time

    from tests.support.servers import observed, send

    def slow(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        time.sleep(6)  # inside this test's 10 s webhook timeout
        send(request, 200, b"ok")

    slow, slow_run = observed(slow)
    settings = make_settings(webhook_secret=SECRET, webhook_max_attempts=4, webhook_timeout_seconds=10)
    with TestClient(create_app(settings)) as signed_client:
        slow_hook = image_server.add_handler(slow)
        first = finished_request(signed_client, image_server, slow_hook)
        deadline = time.monotonic() + 5
        while image_server.hits_for(slow_hook) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        fast_hook = webhook_receiver.new_url()
        finished_request(signed_client, image_server, fast_hook)
        (delivered,) = webhook_receiver.wait_for(fast_hook, 1)
        assert wait_webhook_state(signed_client, first, "delivered")["attempts"] == 1
    assert delivered.at < slow_run.ended_at  # while the slow receiver was still answering


def test_a_retry_waits_as_long_as_the_receivers_retry_after_says(make_settings, image_server):
    """The backoff here is about 0.05 s; the receiver asks for 2 s."""
    from tests.support.servers import send

    answers = [(503, {"Retry-After": "2"}), (200, {})]

    def receiver(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        status, headers = answers.pop(0) if answers else (200, {})
        send(request, status, b"busy" if status >= 300 else b"ok", headers)

    settings = make_settings(webhook_secret=SECRET, webhook_max_attempts=4, webhook_retry_base_seconds=0.05)
    with TestClient(create_app(settings)) as client:
        request_id = finished_request(client, image_server, image_server.add_handler(receiver))
        webhook = wait_webhook_state(client, request_id, "delivered")
        log = client.get(f"/requests/{request_id}/webhook-deliveries").json()["deliveries"]
    assert webhook["attempts"] == 2 and [d["status_code"] for d in log] == [503, 200]
    first, second = (datetime.fromisoformat(d["attempted_at"]) for d in log)
    assert (second - first).total_seconds() >= 2, log


def _event_for(services, hook: str) -> int:
    import io

    from app.db.session import writer_sessionmaker
    from app.services.batches import create_batch
    from app.services.csv_checks import CsvLimits
    from app.webhooks.events import create_finished_event

    with writer_sessionmaker(services.engine).begin() as session:
        request = create_batch(
            session,
            io.BytesIO(csv_of([(1, "A", ["http://a.example/x.jpg"])])),
            CsvLimits(1_000_000, 1 << 20, 1000, 50),
            webhook_url=hook,
            owner=None,
        )
        request.status, request.completed_at = "completed_with_errors", FINISHED_AT
        request.total_images, request.succeeded_images = 6, 3
        request.failed_images, request.cancelled_images = 1, 2
        request.options = '{"format": "webp", "quality": 70}'
        return create_finished_event(session, request, "http://testserver")


FINISHED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _set_event(services, event_id: int, **values) -> None:
    from sqlalchemy import update

    from app.db.models import WebhookEvent
    from app.db.session import writer_sessionmaker

    with writer_sessionmaker(services.engine).begin() as session:
        session.execute(update(WebhookEvent).where(WebhookEvent.id == event_id).values(**values))


def _event(services, event_id: int):
    from app.db.models import WebhookEvent
    from app.db.session import writer_sessionmaker

    with writer_sessionmaker(services.engine)() as session:
        return session.get(WebhookEvent, event_id)


def test_the_deliverer_attempts_only_due_unclaimed_events_and_schedules_the_next(
    make_settings, webhook_receiver
):
    """The deliverer on its own: what is due, when the next is, and what one attempt
    records (an answer from 300 up is a failure, 299 a delivery)."""
    from app.composition import build_parts
    from app.db.base import utcnow
    from app.webhooks.delivery import CLAIM_LEASE

    services = build_parts(
        make_settings(webhook_retry_base_seconds=100, webhook_max_attempts=5), runs_images=False
    )
    deliverer = services.deliverer
    hook = webhook_receiver.new_url(fail_with=[300, 299])
    try:
        event_id = _event_for(services, hook)
        assert deliverer.due_event_ids() == [event_id] and deliverer.seconds_until_next_due() == 0.0

        _set_event(services, event_id, claimed_at=utcnow())  # another process is on it
        assert deliverer.due_event_ids() == [] and deliverer.seconds_until_next_due() is None
        assert deliverer.attempt(event_id) is False
        _set_event(services, event_id, claimed_at=None, next_attempt_at=utcnow() + timedelta(seconds=50))
        assert deliverer.due_event_ids() == [] and 40 < deliverer.seconds_until_next_due() <= 50
        assert deliverer.attempt(event_id) is False
        assert webhook_receiver.received(hook) == []

        # Due, and the claim of a process that stopped long ago has run out.
        _set_event(
            services,
            event_id,
            next_attempt_at=utcnow(),
            claimed_at=utcnow() - CLAIM_LEASE - timedelta(seconds=1),
        )
        assert deliverer.due_event_ids() == [event_id] and deliverer.seconds_until_next_due() == 0.0
        other_id = _event_for(services, webhook_receiver.new_url())  # due as well
        # Longest due first, not in the order the events were made.
        _set_event(services, other_id, next_attempt_at=utcnow() - timedelta(minutes=1))
        assert deliverer.due_event_ids() == [other_id, event_id]
        assert deliverer.due_event_ids(limit=1) == [other_id]
        assert deliverer.seconds_until_next_due() == 0.0
        before = utcnow()
        assert deliverer.attempt(event_id) is True
        other = _event(services, other_id)  # the attempt took only the event it names
        assert (other.attempts, other.claimed_at, other.state) == (0, None, "pending")
        _set_event(services, other_id, state="delivered")
        event = _event(services, event_id)
        assert (event.state, event.attempts, event.claimed_at) == ("pending", 1, None)
        assert (event.last_status_code, event.last_error, event.delivered_at) == (300, "HTTP 300", None)
        # The backoff from 100 s, jittered by 25% either way, and not due before it.
        assert before + timedelta(seconds=75) <= event.next_attempt_at <= utcnow() + timedelta(seconds=125)
        assert deliverer.attempt(event_id) is False
        assert 70 < deliverer.seconds_until_next_due() <= 125

        _set_event(services, event_id, next_attempt_at=utcnow())
        assert deliverer.attempt(event_id) is True
        event = _event(services, event_id)
        assert (event.state, event.attempts, event.claimed_at, event.last_status_code) == (
            "delivered",
            2,
            None,
            299,
        )
        assert event.delivered_at is not None and event.delivered_at >= before
        assert deliverer.attempt(event_id) is False and deliverer.due_event_ids() == []
        received = webhook_receiver.received(hook)
        assert len(received) == 2
        payload = json.loads(received[0].body)
        assert payload == {
            "type": "batch.finished",
            "request_id": payload["request_id"],
            "status": "completed_with_errors",
            "completed_at": FINISHED_AT.isoformat(),
            "total_images": 6,
            "succeeded_images": 3,
            "failed_images": 1,
            "cancelled_images": 2,
            "reused_images": 0,
            "processed_images": 3,
            "download_url": f"http://testserver/download/{payload['request_id']}",
            "options": {"format": "webp", "quality": 70},
        }
        assert received[1].body == received[0].body
        assert received[0].headers["content-type"] == "application/json"
        assert received[0].headers["webhook-id"] == received[1].headers["webhook-id"] == event.webhook_id
    finally:
        services.close()


def test_the_deliverer_stops_at_the_attempt_limit(make_settings, webhook_receiver):
    from app.composition import build_parts
    from app.db.base import utcnow

    services = build_parts(
        make_settings(webhook_retry_base_seconds=100, webhook_max_attempts=2), runs_images=False
    )
    hook = webhook_receiver.new_url(fail_with=[500, 500, 500])
    try:
        event_id = _event_for(services, hook)
        assert services.deliverer.attempt(event_id) is True
        assert _event(services, event_id).state == "pending"
        _set_event(services, event_id, next_attempt_at=utcnow())
        assert services.deliverer.attempt(event_id) is True
        event = _event(services, event_id)
        assert (event.state, event.attempts, event.claimed_at, event.last_status_code) == (
            "failed",
            2,
            None,
            500,
        )
        _set_event(services, event_id, next_attempt_at=utcnow())
        assert services.deliverer.attempt(event_id) is False
        assert len(webhook_receiver.received(hook)) == 2
    finally:
        services.close()


def test_the_next_attempt_waits_for_the_receivers_retry_after_when_it_is_longer_than_the_backoff(
    make_settings, image_server
):
    """The deliverer on its own: the backoff is 75 to 125 s here; a receiver asking for an
    hour gets an hour, one asking for a second still gets the backoff."""
    from app.composition import build_parts
    from app.db.base import utcnow
    from tests.support.servers import send

    def asking(seconds: str):
        def receiver(request):
            request.rfile.read(int(request.headers["Content-Length"]))
            send(request, 503, b"busy", {"Retry-After": seconds})

        return receiver

    services = build_parts(
        make_settings(webhook_retry_base_seconds=100, webhook_max_attempts=5), runs_images=False
    )
    try:
        hour = _event_for(services, image_server.add_handler(asking("3600")))
        second = _event_for(services, image_server.add_handler(asking("1")))
        before = utcnow()
        assert services.deliverer.attempt(hour) and services.deliverer.attempt(second)
        after = utcnow()
        hour, second = _event(services, hour), _event(services, second)
    finally:
        services.close()
    assert (hour.state, hour.last_status_code, second.state, second.last_status_code) == (
        "pending",
        503,
        "pending",
        503,
    )
    assert before + timedelta(hours=1) <= hour.next_attempt_at <= after + timedelta(hours=1)
    assert before + timedelta(seconds=75) <= second.next_attempt_at <= after + timedelta(seconds=125)


def _deliveries(services, event_id: int) -> list:
    from sqlalchemy import select

    from app.db.models import WebhookDelivery
    from app.db.session import writer_sessionmaker

    with writer_sessionmaker(services.engine)() as session:
        return list(
            session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.event_id == event_id)
                .order_by(WebhookDelivery.attempt)
            )
        )


def test_each_attempt_is_counted_by_how_it_ended_and_each_failed_one_logged(
    make_settings, webhook_receiver, caplog
):
    """`image_service_webhook_deliveries_total` by outcome, the operator's view of the
    receivers; a failed attempt is logged with its event and error, a delivery is not."""
    import logging

    from app.composition import build_parts
    from app.db.base import utcnow

    services = build_parts(
        make_settings(webhook_retry_base_seconds=100, webhook_max_attempts=2), runs_images=False
    )

    def counted() -> dict[str, float]:
        return {
            outcome: services.metrics.registry.get_sample_value(
                "image_service_webhook_deliveries_total", {"outcome": outcome}
            )
            or 0
            for outcome in ("delivered", "failed", "exhausted")
        }

    caplog.set_level(logging.INFO, logger="app.webhooks.delivery")
    try:
        retried = _event_for(services, webhook_receiver.new_url(fail_with=[503, 500]))
        delivered = _event_for(services, webhook_receiver.new_url())
        blocked = _event_for(services, "http://10.0.0.1/hook")  # a private address
        assert services.deliverer.attempt(retried) is True
        assert counted() == {"delivered": 0, "failed": 1, "exhausted": 0}
        _set_event(services, retried, next_attempt_at=utcnow())
        assert services.deliverer.attempt(retried) is True
        assert counted() == {"delivered": 0, "failed": 1, "exhausted": 1}
        assert services.deliverer.attempt(delivered) is True
        assert counted() == {"delivered": 1, "failed": 1, "exhausted": 1}
        # Refused by the guard: no later attempt could do better, so the first is the last.
        assert services.deliverer.attempt(blocked) is True
        assert counted() == {"delivered": 1, "failed": 1, "exhausted": 2}
        event = _event(services, blocked)
        assert (event.state, event.attempts) == ("failed", 1)
        assert event.last_error.startswith("blocked_address")
        ids = {key: _event(services, key).webhook_id for key in (retried, blocked)}
    finally:
        services.close()
    logged = [r.getMessage() for r in caplog.records if r.name == "app.webhooks.delivery"]
    assert logged == [
        f"webhook {ids[retried]} attempt 1 failed: HTTP 503",
        f"webhook {ids[retried]} attempt 2 failed: HTTP 500",
        f"webhook {ids[blocked]} attempt 1 failed: {event.last_error}",
    ]


def test_a_delivery_row_says_when_its_attempt_started(make_settings, image_server):
    from app.composition import build_parts
    from app.db.base import utcnow
    from tests.support.servers import send

    arrived = []

    def receiver(request):
        arrived.append(utcnow())
        request.rfile.read(int(request.headers["Content-Length"]))
        send(request, 204)

    services = build_parts(make_settings(), runs_images=False)
    try:
        event_id = _event_for(services, image_server.add_handler(receiver))
        before = utcnow()
        assert services.deliverer.attempt(event_id) is True
        (delivery,) = _deliveries(services, event_id)
    finally:
        services.close()
    assert (delivery.attempt, delivery.status_code, delivery.error) == (1, 204, None)
    # Sent after it started: the time is the attempt's start, not when it was written down.
    assert before <= delivery.attempted_at <= arrived[0]


def test_an_attempts_outcome_decides_only_while_its_claim_and_budget_are_current(make_settings, image_server):
    """An attempt outlived by its claim (another process took the event over) or by a
    redelivery is written to the log, but leaves the event, and every other event, alone."""
    from app.composition import build_parts
    from app.db.base import utcnow
    from app.db.session import writer_sessionmaker
    from app.webhooks.events import redeliver
    from tests.support.servers import send

    services = build_parts(
        make_settings(webhook_retry_base_seconds=100, webhook_max_attempts=1), runs_images=False
    )
    events = {}

    # Each reads the request's body: the next request comes on the same connection.
    def taken_over(request):  # its lease ran out while it was being answered
        request.rfile.read(int(request.headers["Content-Length"]))
        _set_event(services, events["taken over"], attempts=2, claimed_at=utcnow())
        send(request, 200)

    def redelivered(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        with writer_sessionmaker(services.engine).begin() as session:
            redeliver(session, _event(services, events["redelivered"]).request_pk)
        send(request, 500)

    try:
        events["taken over"] = _event_for(services, image_server.add_handler(taken_over))
        events["redelivered"] = _event_for(services, image_server.add_handler(redelivered))
        # Another event after its first attempt, waiting for its second.
        waiting = _event_for(services, image_server.add(b"never asked"))
        _set_event(services, waiting, attempts=1, next_attempt_at=utcnow() + timedelta(hours=1))

        assert services.deliverer.attempt(events["taken over"]) is True
        event = _event(services, events["taken over"])
        assert (event.state, event.attempts, event.last_status_code) == ("pending", 2, None)
        assert event.claimed_at is not None
        assert [(d.attempt, d.status_code) for d in _deliveries(services, event.id)] == [(1, 200)]

        # The last attempt of the budget failed, but a redelivery started a new budget.
        assert services.deliverer.attempt(events["redelivered"]) is True
        event = _event(services, events["redelivered"])
        assert (event.state, event.attempts, event.last_status_code) == ("pending", 1, None)
        assert services.deliverer.due_event_ids() == [event.id]
        assert [(d.attempt, d.status_code) for d in _deliveries(services, event.id)] == [(1, 500)]

        other = _event(services, waiting)
        assert (other.state, other.attempts, other.claimed_at, other.last_status_code) == (
            "pending",
            1,
            None,
            None,
        )
    finally:
        services.close()


def test_a_receiver_too_slow_is_cut_off_at_the_timeout_and_its_attempt_recorded_as_one(
    make_settings, image_server
):
    """A receiver sending its answer a byte at a time never lets a read time out: the
    attempt's wall-clock deadline ends it."""
    from app.composition import build_parts
    from tests.support.servers import dripping_headers, observed

    handler, run = observed(dripping_headers(0.05, 600))  # 30 s to answer
    services = build_parts(
        make_settings(webhook_timeout_seconds=0.5, webhook_retry_base_seconds=100), runs_images=False
    )
    try:
        event_id = _event_for(services, image_server.add_handler(handler))
        assert services.deliverer.attempt(event_id) is True
        event = _event(services, event_id)
        (delivery,) = _deliveries(services, event_id)
    finally:
        services.close()
    assert run.ended.wait(10) and not run.answered_in_full
    assert (event.state, event.last_status_code, event.last_error) == ("pending", None, "timeout after 0.5 s")
    assert (delivery.status_code, delivery.error) == (None, "timeout after 0.5 s")


def test_a_redelivery_queues_the_latest_event_at_once_even_while_an_attempt_holds_it(
    make_settings, webhook_receiver
):
    from app.composition import build_parts
    from app.db.base import utcnow
    from app.db.session import writer_sessionmaker
    from app.webhooks.events import redeliver

    services = build_parts(make_settings(), runs_images=False)
    try:
        event_id = _event_for(services, webhook_receiver.new_url())
        _set_event(
            services,
            event_id,
            state="failed",
            attempts=3,
            claimed_at=utcnow(),
            next_attempt_at=utcnow() + timedelta(hours=1),
        )
        request_pk = _event(services, event_id).request_pk
        with writer_sessionmaker(services.engine).begin() as session:
            assert redeliver(session, request_pk) == event_id
            assert redeliver(session, request_pk + 1000) is None  # no event, nothing queued
        event = _event(services, event_id)
        assert (event.state, event.claimed_at, event.attempts_before_redelivery) == ("pending", None, 3)
        assert services.deliverer.due_event_ids() == [event_id]
    finally:
        services.close()


def test_an_event_is_claimed_while_its_attempt_runs(make_settings, image_server):
    """Two attempts of the same event at once: one posts, the other finds it claimed."""
    import threading
    import time

    from app.composition import build_parts
    from tests.support.servers import send

    posted = []

    def slow_receiver(request):
        posted.append(request.path)
        time.sleep(0.5)
        send(request, 200, b"ok", {"Content-Type": "text/plain"})

    services = build_parts(make_settings(), runs_images=False)
    try:
        event_id = _event_for(services, image_server.add_handler(slow_receiver))
        start = threading.Barrier(2)
        made = []

        def attempt():
            start.wait()
            made.append(services.deliverer.attempt(event_id))

        threads = [threading.Thread(target=attempt) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(made) == [False, True] and len(posted) == 1
        assert (_event(services, event_id).state, _event(services, event_id).attempts) == ("delivered", 1)
    finally:
        services.close()


def test_the_latest_event_is_the_newest_of_the_request(make_settings, webhook_receiver):
    """A retried request has an event per finish; its status shows the newest."""
    from app.composition import build_parts
    from app.db.models import ProcessingRequest
    from app.db.session import writer_sessionmaker
    from app.webhooks.events import create_finished_event, latest_event

    services = build_parts(make_settings(), runs_images=False)
    try:
        first_id = _event_for(services, webhook_receiver.new_url())
        request_pk = _event(services, first_id).request_pk
        with writer_sessionmaker(services.engine).begin() as session:
            second_id = create_finished_event(session, session.get(ProcessingRequest, request_pk), "http://t")
        with writer_sessionmaker(services.engine)() as session:
            assert latest_event(session, request_pk).id == second_id > first_id
            assert latest_event(session, request_pk + 1000) is None
    finally:
        services.close()
