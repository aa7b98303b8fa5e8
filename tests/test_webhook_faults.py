"""Webhook attempts whose outcome cannot be recorded, and receivers the guard refuses:
nothing vanishes silently, nothing stays claimed for the claim's lease, nothing is
retried that cannot succeed."""

import json
import logging
import time
from datetime import UTC, datetime

from fastapi.testclient import TestClient
from sqlalchemy import delete, select, text

from alembic import command
from app.db.migrate import alembic_config
from app.db.models import ProcessingRequest, WebhookEvent
from app.db.session import build_engine
from app.main import create_app
from tests.conftest import csv_of, upload
from tests.support import images
from tests.support.servers import WebhookReceiver, send
from tests.test_webhooks import finished_request, wait_webhook_state


def wait_for_record(caplog, logger: str, level: int, timeout: float = 15) -> logging.LogRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if record.name == logger and record.levelno >= level:
                return record
        time.sleep(0.05)
    raise AssertionError(f"nothing logged by {logger} at {logging.getLevelName(level)} or above")


def separate_sqlite(tmp_path, *triggers: str) -> str:
    """A database of the test's own, with SQL triggers that make some writes fail."""
    url = f"sqlite:///{tmp_path / 'faulty.db'}"
    config = alembic_config(url)
    config.attributes["configure_logging"] = False  # alembic.ini's would drop caplog's handler
    command.upgrade(config, "head")
    engine = build_engine(url)
    with engine.begin() as connection:
        for trigger in triggers:
            connection.execute(text(trigger))
    engine.dispose()
    return url


def test_a_blocked_webhook_target_fails_at_once_without_retries(make_settings, image_server):
    with (
        WebhookReceiver() as outside,  # not on the webhook allowlist: refused by the guard
        TestClient(create_app(make_settings(webhook_max_attempts=8))) as client,
    ):
        hook = outside.new_url()
        request_id = finished_request(client, image_server, hook)
        webhook = wait_webhook_state(client, request_id, "failed")
        log = client.get(f"/requests/{request_id}/webhook-deliveries").json()
    assert webhook["attempts"] == 1
    assert [d["error"].split(":")[0] for d in log["deliveries"]] == ["blocked_address"]
    assert outside.received(hook) == []


def test_an_attempt_for_a_request_deleted_meanwhile_is_logged(
    make_settings, image_server, database_url, caplog
):
    engine = build_engine(database_url)
    webhook_ids = []

    def delete_the_request_then_accept(request):
        body = request.rfile.read(int(request.headers["content-length"]))
        webhook_ids.append(request.headers["webhook-id"])
        with engine.begin() as connection:
            connection.execute(
                delete(ProcessingRequest).where(
                    ProcessingRequest.request_id == json.loads(body)["request_id"]
                )
            )
        send(request, 200)

    hook = image_server.add_handler(delete_the_request_then_accept)
    try:
        with (
            caplog.at_level(logging.WARNING, logger="app.webhooks.delivery"),
            TestClient(create_app(make_settings())) as client,
        ):
            # Not waiting for the status: the request is gone once its webhook is sent.
            upload(client, csv_of([(1, "A", [image_server.add(images.jpeg())])]), webhook_url=hook)
            record = wait_for_record(caplog, "app.webhooks.delivery", logging.WARNING)
    finally:
        engine.dispose()
    assert webhook_ids and webhook_ids[0] in record.getMessage()
    assert "deleted" in record.getMessage()
    assert image_server.hits_for(hook) == 1


def test_an_attempt_whose_delivery_row_cannot_be_written_releases_its_event(
    make_settings, image_server, webhook_receiver, tmp_path, caplog
):
    url = separate_sqlite(
        tmp_path,
        "CREATE TRIGGER refuse_deliveries BEFORE INSERT ON webhook_deliveries "
        "BEGIN SELECT RAISE(ABORT, 'the delivery log refuses writes'); END",
    )
    hook = webhook_receiver.new_url()
    # Retries an hour apart: the released event is not attempted again during the test.
    settings = make_settings(database_url=url, webhook_retry_base_seconds=3600)
    with (
        caplog.at_level(logging.WARNING, logger="app.webhooks.delivery"),
        TestClient(create_app(settings)) as client,
    ):
        finished_request(client, image_server, hook)
        record = wait_for_record(caplog, "app.webhooks.delivery", logging.ERROR)
    engine = build_engine(url)
    with engine.connect() as connection:
        event = connection.execute(
            select(
                WebhookEvent.state,
                WebhookEvent.attempts,
                WebhookEvent.claimed_at,
                WebhookEvent.next_attempt_at,
            )
        ).one()
    engine.dispose()
    assert "released" in record.getMessage() and record.exc_info is not None
    assert (event.state, event.attempts, event.claimed_at) == ("pending", 1, None)
    next_attempt_at = event.next_attempt_at.replace(tzinfo=UTC)
    assert (next_attempt_at - record_time(record)).total_seconds() > 1000
    assert len(webhook_receiver.received(hook)) == 1


def record_time(record: logging.LogRecord) -> datetime:
    return datetime.fromtimestamp(record.created, UTC)


def test_an_attempt_that_raises_is_logged_by_the_runner(
    make_settings, image_server, webhook_receiver, tmp_path, caplog
):
    url = separate_sqlite(
        tmp_path,
        "CREATE TRIGGER refuse_claims BEFORE UPDATE OF claimed_at ON webhook_events "
        "BEGIN SELECT RAISE(ABORT, 'the events refuse claims'); END",
    )
    hook = webhook_receiver.new_url()
    with (
        caplog.at_level(logging.ERROR),
        TestClient(create_app(make_settings(database_url=url))) as client,
    ):
        finished_request(client, image_server, hook)
        record = wait_for_record(caplog, "app.webhooks.delivery", logging.ERROR)
    assert record.exc_info is not None and "refuse claims" in str(record.exc_info[1])
    assert webhook_receiver.received(hook) == []
