"""Shared fixtures: a migrated database (SQLite, or PostgreSQL via TEST_DATABASE_URL),
real local HTTP servers for images and webhooks, and the app with its real runner."""

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import models  # noqa: F401 - registers the tables
from app.db.base import Base
from app.db.migrate import upgrade_to_head
from app.db.session import build_engine
from app.main import create_app
from tests.servers import LocalServer, WebhookReceiver

FINISHED = {"completed", "completed_with_errors", "failed", "cancelled"}


def _reset_postgres(url: str) -> None:
    engine = build_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        if make_url(url).get_backend_name() == "postgresql":
            _reset_postgres(url)
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'test.db'}"
    upgrade_to_head(url)
    return url


@pytest.fixture(autouse=True)
def empty_database(request) -> None:
    """Each test starts with empty tables: a runner picks up any pending work it finds,
    so work left by one test would otherwise be processed during the next."""
    if "database_url" not in request.fixturenames:
        return
    engine = build_engine(request.getfixturevalue("database_url"))
    tables = ", ".join(reversed([table.name for table in Base.metadata.sorted_tables]))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                connection.execute(table.delete())
    engine.dispose()


@pytest.fixture(scope="session")
def image_server() -> Iterator[LocalServer]:
    with LocalServer() as server:
        yield server


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture
def make_settings(database_url, tmp_path, image_server, webhook_receiver) -> Callable[..., Settings]:
    def make(**overrides) -> Settings:
        values = {
            "database_url": database_url,
            "media_root": tmp_path / "media",
            "public_base_url": "http://testserver",
            "allow_private_hosts": f"127.0.0.1:{image_server.port},127.0.0.1:{webhook_receiver.port}",
            "webhook_allow_private_hosts": f"127.0.0.1:{image_server.port},127.0.0.1:{webhook_receiver.port}",
            "download_timeout_seconds": 5,
            "webhook_retry_base_seconds": 0.05,
            "webhook_timeout_seconds": 2,
            "recovery_interval_seconds": 0.5,
            "lease_seconds": 30,
            "worker_concurrency": 4,
            # Stages on threads keep each app start quick; tests that name image_processes
            # (and the subprocess tests, on the defaults) run them in worker processes.
            "image_processes": 0,
            "shutdown_grace_seconds": 2,
        }
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return make


@pytest.fixture
def settings(make_settings) -> Settings:
    return make_settings()


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def media_root(settings) -> Path:
    return settings.media_root


def unique_path(suffix: str = "") -> str:
    return f"/{uuid.uuid4().hex}{suffix}"


def csv_of(rows: list[tuple[int, str, list[str]]]) -> bytes:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for serial, name, urls in rows:
        writer.writerow([serial, name, ",".join(urls)])
    return buffer.getvalue().encode()


def upload(client: TestClient, csv_bytes: bytes, webhook_url: str | None = None, headers=None):
    data = {"webhook_url": webhook_url} if webhook_url else {}
    return client.post(
        "/upload", files={"file": ("products.csv", csv_bytes, "text/csv")}, data=data, headers=headers
    )


def wait_finished(client: TestClient, request_id: str, timeout: float = 30, headers=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/status/{request_id}", headers=headers).json()
        if body["status"] in FINISHED:
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"request did not finish in {timeout} s: {body['progress']}")
        time.sleep(0.05)


def pytest_report_header(config) -> str:
    return f"database: {os.environ.get('TEST_DATABASE_URL') or 'SQLite (temporary file)'}"
