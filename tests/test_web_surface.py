"""The web surface against a hostile client or browser, and when its parts go away:
bounded metrics labels, Host and cross-site checks, /docs served from the service alone,
503 while the database is unreachable, and what /readyz and `make help` say."""

import logging
import os
import subprocess
import time
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

from app.composition import stage_config
from app.config import PROJECT_ROOT
from app.main import create_app
from app.metrics import OTHER_METHOD, STANDARD_METHODS, UNMATCHED_ROUTE
from app.pipeline.stages import ImageStages
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.s3_server import PausableTcpProxy
from tests.support.storage import FillableStorage
from tests.test_pages import BROWSER, BrowserPage, chromium, needs_chromium, start_service
from tests.test_storage_failures import wait_all_waiting

__all__ = ["chromium", "start_service"]  # fixtures used here

HTTP_FAMILY = "image_service_http_request_seconds"


def scrape(client: TestClient, headers=None) -> str:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    return response.text


def http_series(text: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in text_string_to_metric_families(text)
        if family.name == HTTP_FAMILY
        for sample in family.samples
        if sample.name == f"{HTTP_FAMILY}_count"
    ]


def route_templates(app) -> set[str]:
    """The templates of the API's documented routes, which the test's requests name."""
    return {UNMATCHED_ROUTE, *app.openapi()["paths"]}


# ------------------------------------------------------------------ metrics and access lines


@pytest.mark.parametrize("api_keys", ["", "key-one"], ids=["open", "with-api-keys"])
def test_made_up_methods_leave_the_metrics_and_access_lines_bounded(make_settings, caplog, api_keys):
    settings = make_settings(api_keys=api_keys)
    key = {"Authorization": "Bearer key-one"} if api_keys else {}
    paths = ["/upload", "/status/some-id", "/requests", "/not-a-route", "/metrics"]

    def send_made_up_methods(first: int, count: int) -> None:
        for n in range(first, first + count):
            method = f"M{n}" if n % 3 else "X" * 2000 + str(n)  # long methods too
            client.request(method, paths[n % len(paths)])
            client.request("GET", f"/status/id-{n}")  # 401 with keys, else 404

    with TestClient(create_app(settings)) as client:
        caplog.set_level(logging.INFO, logger="app.access")
        scrape(client, key)  # so that the scrapes below find their own series
        send_made_up_methods(0, 150)
        first = scrape(client, key)
        send_made_up_methods(150, 150)
        second = scrape(client, key)
        templates = route_templates(client.app)

    series = http_series(second)
    assert {labels["method"] for labels in series} <= STANDARD_METHODS | {OTHER_METHOD}
    assert OTHER_METHOD in {labels["method"] for labels in series}
    assert {labels["route"] for labels in series} <= templates
    assert all(labels["status"].isdigit() and len(labels["status"]) == 3 for labels in series)
    # Twice the made-up requests, no new series: only the counts grew.
    assert len(http_series(first)) == len(series)
    assert len(second) < len(first) * 1.05
    statuses = {labels["status"] for labels in series}
    assert ({"401", "405"} if api_keys else {"404", "405"}) <= statuses

    access = [record for record in caplog.records if record.name == "app.access"]
    assert len(access) >= 600 + 3
    assert {record.method for record in access} <= STANDARD_METHODS | {OTHER_METHOD}
    assert all(len(record.getMessage()) < 200 for record in access)


def test_docs_openapi_and_mounts_are_labelled_by_their_route(client):
    for path in ("/docs", "/openapi.json", "/static/style.css", "/docs/swagger-ui/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
    routes = {labels["route"] for labels in http_series(scrape(client))}
    assert {"/docs", "/openapi.json", "/static/{path}", "/docs/swagger-ui/{name}"} <= routes


# ------------------------------------------------------------------ Host and cross-site checks


def assert_problem(response, status: int, slug: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"].endswith(slug)


@pytest.mark.parametrize("api_keys", ["", "key-one"], ids=["open", "with-api-keys"])
def test_an_unknown_host_is_refused_but_probes_answer(make_settings, api_keys):
    key = {"Authorization": "Bearer key-one"} if api_keys else {}
    with TestClient(create_app(make_settings(api_keys=api_keys))) as client:
        rebound = {"Host": "rebind.attacker.example", **key}
        for path in ("/requests", "/", "/docs", "/openapi.json", "/metrics"):
            assert_problem(client.get(path, headers=rebound), 400, "unknown-host")
        assert_problem(client.get("/requests", headers={**BROWSER, **rebound}), 400, "unknown-host")
        assert client.get("/healthz", headers=rebound).status_code == 200
        assert client.get("/readyz", headers=rebound).status_code == 200
        # PUBLIC_BASE_URL's name (the test client's), with or without a port, in any case.
        for host in ("testserver", "TestServer:80", "localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert client.get("/requests", headers={"Host": host, **key}).status_code == 200, host


@pytest.mark.parametrize(
    ("overrides", "allowed", "refused"),
    [
        ({"host": "0.0.0.0"}, ["localhost", "127.0.0.1", "[::1]", "testserver"], ["10.0.0.5"]),
        ({"host": "10.0.0.5"}, ["10.0.0.5:8000", "testserver"], ["localhost", "127.0.0.1"]),
        (
            {"host": "10.0.0.5", "allowed_hosts": "images.internal, 192.0.2.7"},
            ["images.internal", "192.0.2.7:8000"],
            ["other.internal"],
        ),
        (
            {"host": "10.0.0.5", "public_base_url": "https://images.example.com"},
            ["images.example.com"],
            ["testserver"],
        ),
        ({"host": "10.0.0.5", "allowed_hosts": "*"}, ["anything.example", "10.9.9.9"], []),
    ],
)
def test_the_allowed_hosts_come_from_the_settings(make_settings, overrides, allowed, refused):
    with TestClient(create_app(make_settings(**overrides))) as client:
        for host in allowed:
            assert client.get("/requests", headers={"Host": host}).status_code == 200, host
        for host in refused:
            assert_problem(client.get("/requests", headers={"Host": host}), 400, "unknown-host")


@pytest.mark.parametrize("api_keys", ["", "key-one"], ids=["open", "with-api-keys"])
def test_a_cross_site_write_is_refused_and_stores_nothing(make_settings, image_server, api_keys):
    key = {"Authorization": "Bearer key-one"} if api_keys else {}
    batch = csv_of([(1, "Shoe", [image_server.add(images.jpeg())])])
    hostile = [
        {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "null"},
    ]
    with TestClient(create_app(make_settings(api_keys=api_keys))) as client:
        for headers in hostile:
            assert_problem(upload(client, batch, headers={**headers, **key}), 403, "cross-site-request")
        assert client.get("/requests", headers=key).json()["items"] == []

        # curl and Postman send neither header; the service's own pages are same-origin.
        accepted = upload(client, batch, headers=key)
        assert accepted.status_code == 202, accepted.text
        same_origin = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin", **key}
        assert upload(client, batch, headers=same_origin).status_code == 202
        request_id = accepted.json()["request_id"]
        wait_finished(client, request_id, headers=key)

        # Reads stay open to any origin (the browser keeps the answer from the other site).
        assert (
            client.get(f"/status/{request_id}", headers={"Origin": "https://evil.example", **key}).status_code
            == 200
        )
        cross_site_delete = client.delete(
            f"/requests/{request_id}", headers={"Origin": "https://evil.example", **key}
        )
        assert_problem(cross_site_delete, 403, "cross-site-request")
        assert client.get(f"/status/{request_id}", headers=key).status_code == 200
        assert client.delete(f"/requests/{request_id}", headers=key).status_code == 204


@needs_chromium
def test_a_form_of_another_origin_cannot_post_to_the_service(chromium, start_service, image_server, tmp_path):
    """A real browser on a page of another origin (another port of 127.0.0.1: same site,
    other origin) submits a form to the service's /upload."""
    service = start_service()
    csv_path = tmp_path / "products.csv"
    csv_path.write_bytes(csv_of([(1, "Shoe", [image_server.add(images.jpeg())])]))
    form = (
        f'<form id="f" action="{service.base_url}/upload" method="post" enctype="multipart/form-data">'
        '<input id="file" type="file" name="file"><button id="go">Go</button></form>'
    )
    form_page = image_server.add(form.encode(), content_type="text/html", suffix=".html")
    browser = BrowserPage(chromium, image_server.base_url)
    try:
        browser.page.goto(form_page)
        browser.page.set_input_files("#file", str(csv_path))
        with browser.page.expect_navigation():
            browser.page.click("#go")
        assert "cross-site-request" in browser.page.content()
        assert service.get("/requests").json()["items"] == []
    finally:
        browser.context.close()


# ------------------------------------------------------------------ /docs from the service alone


class _Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "script":
            if attributes.get("src"):
                self.urls.append(attributes["src"])
            else:
                self.inline_scripts += 1
        if tag == "link" and attributes.get("href"):
            self.urls.append(attributes["href"])


def test_docs_load_only_files_of_the_service_under_a_csp(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy
    assert "unsafe" not in policy
    sources = _Sources()
    sources.feed(page.text)
    assert sources.inline_scripts == 0
    assert len(sources.urls) >= 3
    for url in sources.urls:
        assert urlsplit(url).netloc == "" and url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert client.get("/redoc").status_code == 404
    assert client.get("/docs/oauth2-redirect").status_code == 404
    assert client.get("/docs/swagger-ui/index.html").status_code == 404  # it would load a demo from afar


@needs_chromium
def test_docs_render_with_no_request_leaving_the_service(chromium, start_service):
    service = start_service()
    browser = BrowserPage(chromium, service.base_url)
    requested: list[str] = []
    browser.page.on("request", lambda request: requested.append(request.url))
    try:
        browser.page.goto("/docs")
        browser.page.wait_for_selector(".opblock-summary-path", timeout=30_000)
        paths = browser.page.locator(".opblock-summary-path").all_inner_texts()
        assert any("/upload" in path for path in paths)
        assert browser.errors == []  # CSP violations are console errors
    finally:
        browser.context.close()
    assert any(url.endswith("/openapi.json") for url in requested)
    outside = [
        url for url in requested if not url.startswith(service.base_url + "/") and not url.startswith("data:")
    ]
    assert outside == []


# ------------------------------------------------------------------ the database going away


def database_is_postgres() -> bool:
    url = os.environ.get("TEST_DATABASE_URL")
    return bool(url) and make_url(url).get_backend_name() == "postgresql"


@pytest.mark.skipif(
    not database_is_postgres(),
    reason="needs a database behind a connection that can be cut: TEST_DATABASE_URL=postgresql+psycopg2://...",
)
def test_while_the_database_is_unreachable_the_api_answers_503(make_settings, database_url, image_server):
    url = make_url(database_url)
    with PausableTcpProxy(url.port or 5432, target_host=url.host or "127.0.0.1") as proxy:
        proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        settings = make_settings(database_url=proxied)
        with TestClient(create_app(settings)) as client:
            batch = csv_of([(1, "Shoe", [image_server.add(images.jpeg())])])
            request_id = upload(client, batch).json()["request_id"]
            wait_finished(client, request_id)

            proxy.pause()
            for method, path in (
                ("GET", f"/status/{request_id}"),
                ("GET", "/requests"),
                ("GET", f"/download/{request_id}"),
            ):
                answer = client.request(method, path)
                assert_problem(answer, 503, "unavailable")
                assert int(answer.headers["retry-after"]) > 0
                assert "database" in answer.json()["detail"]
            assert_problem(upload(client, batch), 503, "unavailable")
            ready = client.get("/readyz")
            assert_problem(ready, 503, "unavailable")
            assert "database does not answer" in ready.json()["detail"]
            assert "Connection refused" in ready.json()["detail"] or "connect" in ready.json()["detail"]

            proxy.resume()
            deadline = time.monotonic() + 15
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the service did not recover"
                time.sleep(0.1)
            assert client.get(f"/status/{request_id}").json()["status"] == "completed"


# ------------------------------------------------------------------ /readyz and make help


def test_readyz_says_images_wait_only_while_some_do(make_settings, image_server):
    settings = make_settings(transient_retry_base_seconds=0.1, transient_retry_max_seconds=0.4)
    storage = FillableStorage(settings.media_root)
    storage.full.set()
    stages = ImageStages.from_config(stage_config(settings), storage=storage)
    with TestClient(create_app(settings, stages=stages)) as client:
        batch = csv_of([(1, "Shoe", [image_server.add(images.jpeg())])])
        request_id = upload(client, batch).json()["request_id"]
        wait_all_waiting(client, request_id)
        waiting = client.get("/readyz")
        assert_problem(waiting, 503, "unavailable")
        assert "images wait to be retried" in waiting.json()["detail"]

        assert client.post(f"/requests/{request_id}/cancel").status_code == 202
        wait_finished(client, request_id)
        after_cancel = client.get("/readyz")
        assert_problem(after_cancel, 503, "unavailable")
        detail = after_cancel.json()["detail"]
        assert "wait" not in detail
        assert "storage" in detail and "No space left on device" in detail


def test_make_help_shows_values_not_variable_names():
    shown = subprocess.run(
        ["make", "--no-print-directory", "help"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "make test-postgres" in shown
    assert "$(" not in shown
    assert "postgresql+psycopg2://" in shown
