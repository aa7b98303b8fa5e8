"""Shared fixtures: a migrated database (SQLite, or PostgreSQL via TEST_DATABASE_URL),
real local HTTP servers for images and webhooks, the app with its real runner, whole
deployments as real processes (tests/deployment.py), and a real S3 endpoint (moto)."""

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from fastapi.testclient import TestClient

# No dotenv file for the settings of this process or of any process the tests start: a
# developer's .env in the checkout must not change what the tests run against.
os.environ["ENV_FILE"] = ""

from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.config import Settings
from app.db import models  # noqa: F401 - registers the tables
from app.db.base import Base
from app.db.migrate import upgrade_to_head
from app.db.session import build_engine
from app.main import create_app
from tests.support.s3_server import TEST_CREDENTIALS, TEST_REGION, MotoServer, PausableTcpProxy
from tests.support.servers import LocalServer, WebhookReceiver

if TYPE_CHECKING:  # tests/deployment.py imports this module
    from tests.support.deployment import Deployment

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
            "import_dir": tmp_path / "imports",
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
            # Every test image comes from one local server; tests of politeness set their own.
            "fetch_per_host_concurrency": 64,
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


# -- the service as real processes (tests/deployment.py) ------------------------------


@pytest.fixture
def deployment_env(database_url, tmp_path, image_server, webhook_receiver) -> dict[str, str]:
    """Settings for every process of a deployment, chosen so that recovery is quick: short
    leases and sweeps, quick retries, and one image worker process each on 2 cores."""
    from tests.support.deployment import WEBHOOK_SECRET

    hosts = f"127.0.0.1:{image_server.port},127.0.0.1:{webhook_receiver.port}"
    return {
        "DATABASE_URL": database_url,
        "MEDIA_ROOT": str(tmp_path / "media"),
        "IMPORT_DIR": str(tmp_path / "imports"),
        "ALLOW_PRIVATE_HOSTS": hosts,
        "WEBHOOK_ALLOW_PRIVATE_HOSTS": hosts,
        "LEASE_SECONDS": "3",
        "RECOVERY_INTERVAL_SECONDS": "0.5",
        "WORKER_CONCURRENCY": "8",
        "IMAGE_PROCESSES": "1",
        "DOWNLOAD_TIMEOUT_SECONDS": "10",
        "TRANSIENT_RETRY_BASE_SECONDS": "0.2",
        "TRANSIENT_RETRY_MAX_SECONDS": "1",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
        "SHUTDOWN_GRACE_SECONDS": "5",
        # Every test image comes from one local server: room for both workers on it, so
        # crash and fault tests see work spread; tests of politeness set their own limit.
        "FETCH_PER_HOST_CONCURRENCY": "64",
    }


@pytest.fixture
def deploy(deployment_env, tmp_path) -> Iterator[Callable[..., "Deployment"]]:
    """deploy(runner, workers=2, **settings): a started Deployment, stopped after the test."""
    from tests.support.deployment import Deployment

    started: list[Deployment] = []

    def start(runner: str, *, workers: int = 2, **settings: str) -> Deployment:
        deployment = Deployment(runner, {**deployment_env, **settings}, tmp_path, workers=workers)
        started.append(deployment)
        return deployment.start()

    yield start
    for deployment in started:
        deployment.stop()


# -- a real S3 endpoint (moto), started once when a test asks for it --------------


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory) -> Iterator[MotoServer]:
    with MotoServer(tmp_path_factory.mktemp("moto") / "moto.log") as server:
        yield server


@pytest.fixture(scope="session")
def s3_proxy(moto_server) -> Iterator[PausableTcpProxy]:
    with PausableTcpProxy(moto_server.port) as proxy:
        yield proxy


@pytest.fixture
def running_s3_proxy(s3_proxy) -> Iterator[PausableTcpProxy]:
    """The proxy, running at the start and again at the end of the test, whatever it did."""
    s3_proxy.resume()
    yield s3_proxy
    s3_proxy.resume()


@pytest.fixture
def aws_environment(monkeypatch, tmp_path) -> None:
    """Dummy credentials for boto3's standard chain, and nothing else it could pick up:
    no profile files, no instance metadata, no proxy for 127.0.0.1."""
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture(scope="session")
def s3_admin(moto_server):
    """A plain boto3 client straight to moto, for setting up and inspecting buckets."""
    import boto3  # loaded only by the tests that use S3

    return boto3.session.Session().client(
        "s3",
        endpoint_url=moto_server.endpoint_url,
        region_name=TEST_REGION,
        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


@pytest.fixture
def bucket(s3_admin) -> str:
    name = f"test-{uuid.uuid4().hex[:16]}"
    s3_admin.create_bucket(Bucket=name)
    return name


def stored_keys(s3_admin, bucket: str) -> list[str]:
    pages = s3_admin.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


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


# Under `make mutate`: what each test costs in full (setup, call and teardown), measured in
# mutmut's stats run; mutmut's own figures count the call alone, and a test that starts
# the app or a runner spends as long again in its fixtures.
TEST_COSTS = Path("test-costs.json")
_measured_costs: dict[str, float] = {}
# Every test that fetches or builds the service reaches the network guard and the URL
# grammar. Their mutants run only the tests of the guard and the grammar themselves and of
# the fetcher (docs/mutation.md): a surviving one would otherwise run about a hundred tests.
# MUTATE_EVERY_TEST=1 runs them against every selected test that reaches them.
NET_MUTANT_TESTS = (
    "tests/test_network_guard.py::",
    "tests/test_urls.py::",
    "tests/test_fetch.py::",
    "tests/test_csv_upload.py::test_a_url_list_is_checked",
    "tests/test_csv_upload.py::test_a_port_is_checked_at_once",
    "tests/test_csv_upload.py::test_ordinary_url_lists",
    "tests/test_csv_upload.py::test_the_url_grammar_as_built",
    "tests/test_politeness.py::test_the_host_is_the_urls_authority",
    "tests/test_politeness.py::test_hosts_remembered_over_an_upload",
)


def pytest_runtest_logreport(report) -> None:
    if os.environ.get("MUTANT_UNDER_TEST") == "stats":
        _measured_costs[report.nodeid] = _measured_costs.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session) -> None:
    if os.environ.get("MUTANT_UNDER_TEST") == "stats" and _measured_costs:
        known = json.loads(TEST_COSTS.read_text()) if TEST_COSTS.exists() else {}
        TEST_COSTS.write_text(json.dumps({**known, **_measured_costs}))


def pytest_collection_modifyitems(config, items) -> None:
    """On PostgreSQL (TEST_DATABASE_URL), a test that never touches a database (no
    `database_url` among its fixtures: image codecs, the URL grammar, the fetcher against
    local servers) would only repeat its SQLite run, so it is skipped there.

    Under `make mutate`, each mutant's tests run cheapest first (TEST_COSTS): the run of a
    mutant ends at its first failing test, so a killed mutant costs its cheapest killing
    test. A mutant of the network guard or the URL grammar runs only NET_MUTANT_TESTS."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" in mutant:
        if mutant.startswith("app.net.") and not os.environ.get("MUTATE_EVERY_TEST"):
            others = [item for item in items if not item.nodeid.startswith(NET_MUTANT_TESTS)]
            if others:
                config.hook.pytest_deselected(items=others)
                items[:] = [item for item in items if item.nodeid.startswith(NET_MUTANT_TESTS)]
        if TEST_COSTS.exists():
            costs = json.loads(TEST_COSTS.read_text())
            items.sort(key=lambda item: costs.get(item.nodeid, 0.0))
        # mutmut runs each mutant in a process forked from one that has fetched already:
        # the fetch deadline's thread (app/net/guard.py) did not survive the fork. A new
        # reaper starts a thread of its own at its first deadline.
        from app.net import guard

        guard._reaper = guard.DeadlineReaper()
    if not os.environ.get("TEST_DATABASE_URL"):
        return
    repeat = pytest.mark.skip(reason="touches no database: its SQLite run covers it")
    for item in items:
        if "database_url" not in getattr(item, "fixturenames", ()):
            item.add_marker(repeat)
