"""The pages for people: plain checks of what the service sends (content negotiation,
escaping, CSP, thumbnails, error sentences), then a real browser on the real service.

Browser tests drive Debian's Chromium through Playwright (it cannot download its own
browsers here) and are skipped when `chromium` is not installed; .ci/run installs it.
Their screenshots go to test-output/ at the repository root.
"""

import csv
import io
import re
import shutil
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from fastapi.testclient import TestClient
from PIL import Image

from app.api.html import CONTENT_SECURITY_POLICY
from app.api.image_errors import IMAGE_ERROR_SENTENCES, describe_image_error
from app.config import PROJECT_ROOT
from app.main import create_app
from app.pipeline import failures
from app.storage.local import LocalFileStorage
from tests.conftest import csv_of, upload, wait_finished
from tests.support import corpus, images
from tests.support.servers import Handler, Origin, UnpublishedImage, delayed
from tests.support.service_process import ServiceProcess

BROWSER = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
HOSTILE_NAME = '<script>alert("x")</script><img src=x onerror=alert(1)> Shoe'
TEST_OUTPUT = PROJECT_ROOT / "test-output"


class _PageParts(HTMLParser):
    """The parts of a page the CSP cares about."""

    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.style_elements = 0
        self.style_attributes = 0
        self.inline_handlers: list[str] = []
        self.labels: list[str] = []
        self._in_label = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "script":
            self.scripts.append(attributes)
        if tag == "style":
            self.style_elements += 1
        if "style" in attributes:
            self.style_attributes += 1
        self.inline_handlers += [name for name in attributes if name.startswith("on")]
        if tag == "label":
            self._in_label = True
            self.labels.append("")

    def handle_endtag(self, tag):
        if tag == "label":
            self._in_label = False

    def handle_data(self, data):
        if self._in_label:
            self.labels[-1] += data


def page_parts(html: str) -> _PageParts:
    parts = _PageParts()
    parts.feed(html)
    return parts


def image_id_of(output_url: str) -> int:
    return int(output_url.rsplit("/", 1)[1].removesuffix(".jpg"))


# ------------------------------------------------------------------ what the service sends


def test_browsers_get_the_upload_page_and_api_clients_the_json_index(client):
    page = client.get("/", headers=BROWSER)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    parts = page_parts(page.text)
    assert "CSV file" in parts.labels
    assert any(label.startswith("Webhook URL") for label in parts.labels)
    assert re.search(r"<button type=\"submit\">Upload</button>", page.text)

    for accept in (None, "*/*", "application/json"):
        index = client.get("/", headers={"Accept": accept} if accept else {})
        assert index.headers["content-type"] == "application/json"
        assert index.json() == {
            "service": "batch image service",
            "upload": "POST /upload (multipart: file, webhook_url)",
            "requests": "/requests",
            "docs": "/docs",
        }


def test_page_shells_need_no_key_and_hold_no_request_data(make_settings, image_server):
    settings = make_settings(api_keys="key-one")
    key = {"X-API-Key": "key-one"}
    with TestClient(create_app(settings)) as client:
        accepted = upload(client, csv_of([(1, HOSTILE_NAME, [image_server.add(images.jpeg())])]), headers=key)
        request_id = accepted.json()["request_id"]
        wait_finished(client, request_id, headers=key)

        listing = client.get("/requests", headers=BROWSER)
        request_page = client.get(f"/requests/{request_id}", headers=BROWSER)
        for page in (listing, request_page):
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert 'data-api-key-required="true"' in page.text
            assert "Shoe" not in page.text and "127.0.0.1" not in page.text
        assert f'data-request-id="{request_id}"' in request_page.text

        # JSON clients get what they got before: the key is still needed, then the list.
        assert client.get("/requests").status_code == 401
        assert client.get("/requests", headers=key).json()["items"][0]["request_id"] == request_id
        assert client.get(f"/status/{request_id}", headers=BROWSER).status_code == 401


def test_user_values_are_escaped_in_every_page(client, image_server):
    request_id = upload(client, csv_of([(1, HOSTILE_NAME, [image_server.add(images.jpeg())])])).json()[
        "request_id"
    ]
    wait_finished(client, request_id)
    snapshot = client.get(f"/status/{request_id}", headers=BROWSER).text
    escaped_name = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt; Shoe"
    assert escaped_name in snapshot
    assert f'href="/requests/{request_id}"' in snapshot

    hostile_id = '"><img src=x onerror=alert(1)>'
    page = client.get("/requests/" + requests.utils.quote(hostile_id, safe=""), headers=BROWSER).text
    assert 'data-request-id="&#34;&gt;&lt;img src=x onerror=alert(1)&gt;"' in page
    for html in (snapshot, page):
        parts = page_parts(html)
        assert parts.scripts == [{"type": "module", "src": "/static/pages.js"}]
        assert parts.inline_handlers == []


@pytest.mark.parametrize("path", ["/", "/requests", "/requests/9b2f6c1e-4f7a-4f55-9f4e-2f2d0c6a7b10"])
def test_pages_forbid_inline_scripts_and_styles(client, path):
    page = client.get(path, headers=BROWSER)
    policy = page.headers["content-security-policy"]
    assert policy == CONTENT_SECURITY_POLICY
    for directive in ("script-src 'self'", "style-src 'self'", "object-src 'none'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe-inline" not in policy
    parts = page_parts(page.text)
    assert all("src" in script for script in parts.scripts)
    assert parts.style_elements == 0 and parts.style_attributes == 0
    for asset in ("/static/pages.js", "/static/api.js", "/static/style.css", "/static/favicon.svg"):
        assert client.get(asset).status_code == 200


def test_thumbnails_are_small_public_and_kept_after_the_first_request(make_settings, image_server):
    settings = make_settings(api_keys="key-one")
    key = {"X-API-Key": "key-one"}
    with TestClient(create_app(settings)) as client:
        url = image_server.add(images.jpeg((1000, 600)))
        request_id = upload(client, csv_of([(1, "A", [url])]), headers=key).json()["request_id"]
        output_url = wait_finished(client, request_id, headers=key)["products"][0]["output_image_urls"][0]
        image_id = image_id_of(output_url)

        first = client.get(f"/thumbnails/{request_id}/{image_id}.jpg")  # no key: an <img> sends none
        assert first.status_code == 200
        assert first.headers["content-type"] == "image/jpeg"
        assert "max-age=31536000" in first.headers["cache-control"]
        thumbnail = Image.open(io.BytesIO(first.content))
        assert thumbnail.format == "JPEG" and thumbnail.size == (240, 144)
        kept = settings.media_root / request_id / "thumbs" / f"{image_id}.jpg"
        assert kept.read_bytes() == first.content

        # The second answer comes from storage: it is there even without the output.
        (settings.media_root / request_id / f"{image_id}.jpg").unlink()
        second = client.get(f"/thumbnails/{request_id}/{image_id}.jpg")
        assert second.status_code == 200 and second.content == first.content

    # Deleting a request's outputs takes its thumbnails along.
    storage = LocalFileStorage(settings.media_root)
    assert storage.delete_prefix(f"{request_id}/") == 1
    assert not (settings.media_root / request_id).exists()


def test_a_webp_output_has_a_jpeg_thumbnail(client, image_server):
    url = image_server.add(images.jpeg((1000, 600)))
    response = client.post(
        "/upload", files={"file": ("p.csv", csv_of([(1, "A", [url])]), "text/csv")}, data={"format": "webp"}
    )
    request_id = response.json()["request_id"]
    output_url = wait_finished(client, request_id)["products"][0]["output_image_urls"][0]
    assert output_url.endswith(".webp")
    thumbnail = client.get(f"/thumbnails/{request_id}/{output_url.rsplit('/', 1)[1]}")
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumbnail.content)).size == (240, 144)


@pytest.mark.parametrize(
    "path",
    [
        "/thumbnails/9b2f6c1e-4f7a-4f55-9f4e-2f2d0c6a7b10/1.jpg",  # the right shape, no such output
        "/thumbnails/not-a-request/1.jpg",
        "/thumbnails/9b2f6c1e-4f7a-4f55-9f4e-2f2d0c6a7b10/one.jpg",
        "/thumbnails/9b2f6c1e-4f7a-4f55-9f4e-2f2d0c6a7b10/1.png",
        "/thumbnails/9b2f6c1e-4f7a-4f55-9f4e-2f2d0c6a7b10/thumbs",
        "/thumbnails/..%2F..%2Fetc/passwd.jpg",
    ],
)
def test_anything_but_an_existing_output_has_no_thumbnail(client, path):
    answer = client.get(path)
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("http_404", "the image server answered 404: check the URL"),
        ("http_403", "the image server answered 403: access is refused, so use a public URL"),
        ("http_418", "the image server answered 418: check the URL"),
        ("http_503", "the image server answered 503 (a server error): try again later"),
        ("http_302", "the image server answered 302 instead of sending the image"),
        ("timeout", "the image server did not send the image in time: try again later or check the server"),
        ("not_an_image", "the URL returned something other than an image (a web page?): check the URL"),
        ("something_new", "the image failed (something_new)"),
    ],
)
def test_error_codes_read_as_sentences(code, expected):
    assert describe_image_error(code) == expected


def test_every_error_code_the_pipeline_uses_has_a_sentence():
    def codes(kind):
        yield kind.code
        for sub in kind.__subclasses__():
            yield from codes(sub)

    used = set(codes(failures.ImageFailure)) | {"worker_crashed", "internal_error", "broken_download"}
    assert used - IMAGE_ERROR_SENTENCES.keys() == set()


# ------------------------------------------------------------------ in a real browser

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SLOW_IMAGE_SECONDS = 0.5
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium; .ci/run does)"
)


@pytest.fixture(scope="module")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def start_service(database_url, tmp_path, image_server, webhook_receiver) -> Iterator:
    started: list[ServiceProcess] = []

    def start(**env: str) -> ServiceProcess:
        allowed = f"127.0.0.1:{image_server.port},127.0.0.1:{webhook_receiver.port}"
        service = ServiceProcess(
            {
                "DATABASE_URL": database_url,
                "MEDIA_ROOT": str(tmp_path / "media"),
                "ALLOW_PRIVATE_HOSTS": allowed,
                "WEBHOOK_ALLOW_PRIVATE_HOSTS": allowed,
                "IMAGE_PROCESSES": "0",
                # One image at a time, each served slowly: the progress bar has steps to show.
                "WORKER_CONCURRENCY": "1",
                "WEBHOOK_RETRY_BASE_SECONDS": "0.2",
                **env,
            },
            tmp_path / f"service-{len(started)}.log",
        )
        started.append(service.start())
        return service

    yield start
    for service in started:
        service.stop()


class BrowserPage:
    """A page in a fresh browser context, with every console error and uncaught exception."""

    def __init__(self, browser, base_url: str, width: int = 1280):
        self.context = browser.new_context(
            base_url=base_url, viewport={"width": width, "height": 900}, accept_downloads=True
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda message: message.type == "error" and self.errors.append(message.text))
        self.page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def errors_besides(self, *expected_statuses: int) -> list[str]:
        """Console errors other than Chromium's notes on answers the test expects."""
        expected = tuple(f"status of {status} " for status in expected_statuses)
        return [
            error
            for error in self.errors
            if not (error.startswith("Failed to load resource") and any(s in error for s in expected))
        ]

    def has_no_sideways_scroll(self) -> bool:
        return self.page.evaluate(
            "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
        )


def wait_until_true(page, expression: str, timeout: float = 30) -> None:
    """Poll a JavaScript expression from here: Playwright's wait_for_function polls inside
    the page with eval, which the pages' Content-Security-Policy rightly forbids."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"never true: {expression}"
        time.sleep(0.05)


def slow_image(size) -> Handler:
    return delayed(images.jpeg(size), SLOW_IMAGE_SECONDS)


def write_csv(tmp_path, rows) -> str:
    path = tmp_path / "products.csv"
    path.write_bytes(csv_of(rows))
    return str(path)


def upload_through_the_page(page, csv_path: str, webhook_url: str = "") -> None:
    page.goto("/")
    page.get_by_label("CSV file").set_input_files(csv_path)
    if webhook_url:
        page.get_by_label("Webhook URL").fill(webhook_url)
    page.get_by_role("button", name="Upload").click()


@pytest.mark.slow
@needs_chromium
def test_a_good_csv_through_the_page_to_its_results(
    chromium, start_service, image_server, webhook_receiver, tmp_path
):
    service = start_service()
    good = [image_server.add_handler(slow_image((900 + 40 * n, 600)), ".jpg") for n in range(6)]
    missing = f"{image_server.base_url}/missing.jpg"
    rows = [(1, "Blue shoe", good[:2]), (2, "Red shoe", [good[2], missing]), (3, "Hat", good[3:])]
    hook = webhook_receiver.new_url()
    browser = BrowserPage(chromium, service.base_url)
    page = browser.page

    upload_through_the_page(page, write_csv(tmp_path, rows), hook)
    page.wait_for_url(re.compile(r"/requests/[0-9a-f-]{36}$"))
    request_id = page.url.rsplit("/", 1)[1]
    page.evaluate("window.stillTheSamePage = true")
    page.evaluate(
        """() => {
            window.progressSeen = [];
            const bar = document.querySelector('[role=progressbar]');
            const note = () => window.progressSeen.push(Number(bar.getAttribute('aria-valuenow')));
            note();
            new MutationObserver(note).observe(bar, {attributes: true, attributeFilter: ['aria-valuenow']});
        }"""
    )
    page.get_by_text("completed, with errors").wait_for(timeout=60_000)

    seen = page.evaluate("window.progressSeen")
    assert seen == sorted(seen) and seen[-1] == 100
    assert any(0 < value < 100 for value in seen), seen
    assert page.evaluate("window.stillTheSamePage") is True  # updated in place, never reloaded
    assert page.get_by_role("progressbar").get_attribute("aria-valuenow") == "100"
    assert "7 of 7 images finished: 6 succeeded, 1 failed" in page.locator("#counts").inner_text()

    page.get_by_text("Hat").scroll_into_view_if_needed()
    thumbnails = page.locator("#products img")
    assert thumbnails.count() == 6
    all_loaded = (
        "[...document.querySelectorAll('#products img')].every(i => i.complete && i.naturalWidth > 0)"
    )
    wait_until_true(page, all_loaded)
    for index in range(6):
        thumbnail = thumbnails.nth(index)
        assert f"/thumbnails/{request_id}/" in thumbnail.get_attribute("src")
        assert max(thumbnail.evaluate("img => [img.naturalWidth, img.naturalHeight]")) == 240
    first_link = page.get_by_role("link", name="Image 1 of Blue shoe: open full size")
    assert "/processed_images/" in first_link.get_attribute("href")
    assert page.get_by_text(re.compile("answered 404: check the URL")).is_visible()
    assert page.locator("code", has_text="http_404").is_visible()

    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download CSV").click()
    downloaded = download_info.value.path().read_bytes()
    assert downloaded == service.get(f"/download/{request_id}").content
    table = list(csv.reader(io.StringIO(downloaded.decode())))
    assert table[0][-1] == "Output Image Urls" and [line[1] for line in table[1:]] == [
        "Blue shoe",
        "Red shoe",
        "Hat",
    ]

    page.get_by_text(re.compile("The webhook to .* was delivered")).wait_for()
    page.get_by_role("button", name="Send the webhook again").click()
    page.get_by_text("The webhook is being sent again").wait_for()
    assert len(webhook_receiver.wait_for(hook, 2)) == 2

    TEST_OUTPUT.mkdir(exist_ok=True)
    page.screenshot(path=TEST_OUTPUT / "request-page.png", full_page=True)
    print(f"screenshot: {TEST_OUTPUT / 'request-page.png'}")

    page.goto("/requests")
    entry = page.get_by_role("link", name=request_id)
    entry.wait_for()
    assert (
        page.get_by_role("progressbar", name=f"Progress of request {request_id}").get_attribute(
            "aria-valuenow"
        )
        == "100"
    )
    entry.click()
    page.wait_for_url(f"**/requests/{request_id}")
    assert browser.errors == []


@pytest.mark.slow
@needs_chromium
def test_a_bad_csv_shows_each_problem_by_line_and_stores_nothing(chromium, start_service, tmp_path):
    service = start_service()
    browser = BrowserPage(chromium, service.base_url)
    page = browser.page
    path = tmp_path / "bad.csv"
    path.write_text(
        "S. No.,Product Name,Input Image Urls\n"
        "one,Shoe,https://example.com/a.jpg\n"
        "2,Hat,\n"
        "3,Scarf,ftp://example.com/c.jpg\n"
    )
    upload_through_the_page(page, str(path))

    problems = page.get_by_role("region", name="The file was not accepted")
    problems.wait_for()
    text = problems.inner_text()
    assert "nothing was stored" in text
    assert "Line 2, column “S. No.”: 'one' is not a positive whole number" in text
    assert "Line 3, column “Input Image Urls”: no image URLs" in text
    assert "Line 4, column “Input Image Urls”" in text
    assert page.url == service.base_url + "/"
    assert page.get_by_label("CSV file").is_visible()
    assert service.get("/requests").json()["items"] == []
    assert browser.errors_besides(422) == []


@pytest.mark.slow
@needs_chromium
def test_retry_failed_images_from_the_request_page(
    chromium, start_service, image_server, webhook_receiver, tmp_path
):
    service = start_service()
    unpublished = UnpublishedImage(images.jpeg((300, 200)))
    late = image_server.add_handler(unpublished, ".jpg")
    good = image_server.add(images.jpeg(), suffix=".jpg")
    hook = webhook_receiver.new_url()
    browser = BrowserPage(chromium, service.base_url)
    page = browser.page
    upload_through_the_page(page, write_csv(tmp_path, [(1, "Shoe", [good, late])]), hook)
    page.wait_for_url(re.compile(r"/requests/[0-9a-f-]{36}$"))
    page.get_by_text("completed, with errors").wait_for(timeout=30_000)
    retry = page.get_by_role("button", name="Retry failed images")
    assert retry.is_visible()
    assert page.locator("code", has_text="http_404").is_visible()

    unpublished.published.set()
    retry.click()
    page.get_by_text("The retried images are done.").wait_for(timeout=30_000)
    assert page.locator("#request-status").inner_text() == "completed"
    assert "2 of 2 images finished: 2 succeeded, 0 failed" in page.locator("#counts").inner_text()
    assert not retry.is_visible()  # nothing failed any more
    wait_until_true(page, "document.querySelectorAll('#products img').length === 2")
    assert len(webhook_receiver.wait_for(hook, 2)) == 2
    assert browser.errors == []


@pytest.mark.slow
@needs_chromium
def test_with_api_keys_the_page_asks_for_the_key_once(chromium, start_service, image_server, tmp_path):
    service = start_service(API_KEYS="key-one")
    browser = BrowserPage(chromium, service.base_url)
    page = browser.page
    csv_path = write_csv(tmp_path, [(1, "Shoe", [image_server.add(images.jpeg((300, 200)))])])

    page.goto("/")
    key_input = page.get_by_label("API key")
    key_input.wait_for()
    assert page.get_by_text("This service needs an API key").is_visible()
    key_input.fill("not-the-key")
    page.get_by_role("button", name="Use this key").click()

    page.get_by_label("CSV file").set_input_files(csv_path)
    page.get_by_role("button", name="Upload").click()
    page.get_by_text("That API key was not accepted").wait_for()
    assert page.url == service.base_url + "/"
    key_input.fill("key-one")
    page.get_by_role("button", name="Use this key").click()  # the upload goes on with it

    page.wait_for_url(re.compile(r"/requests/[0-9a-f-]{36}$"))
    request_id = page.url.rsplit("/", 1)[1]
    page.get_by_text("completed").first.wait_for(timeout=60_000)
    assert not key_input.is_visible()
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download CSV").click()
    assert (
        download_info.value.path().read_bytes()
        == service.get(f"/download/{request_id}", headers={"X-API-Key": "key-one"}).content
    )

    page.goto("/requests")
    page.get_by_role("link", name=request_id).wait_for()
    assert not key_input.is_visible()
    assert browser.errors_besides(401) == []


@pytest.mark.slow
@needs_chromium
def test_every_page_fits_390_px_without_sideways_scrolling(chromium, start_service, image_server):
    service = start_service()
    long_name = "An-exceptionally-long-product-name-without-any-spaces-" * 4
    long_url = f"{image_server.base_url}/{'very-long-path-segment-' * 6}missing.jpg"
    accepted = service.post(
        "/upload",
        files={
            "file": ("p.csv", csv_of([(1, long_name, [image_server.add(images.jpeg((800, 500))), long_url])]))
        },
        data={"webhook_url": "https://hooks.example.com/" + "x" * 120},
    ).json()
    browser = BrowserPage(chromium, service.base_url, width=390)
    page = browser.page

    page.goto(f"/requests/{accepted['request_id']}")
    page.get_by_text("completed, with errors").wait_for(timeout=60_000)
    wait_until_true(page, "document.querySelector('#products img')?.naturalWidth > 0")
    assert browser.has_no_sideways_scroll()
    for path in ("/", "/requests"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
        assert browser.has_no_sideways_scroll(), path
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to the content"
    assert browser.errors == []


@pytest.mark.slow
@needs_chromium
def test_an_image_waiting_for_its_origin_says_for_which_host_and_how_long(
    chromium, start_service, image_server
):
    with Origin(images.jpeg(), max_in_flight=0, retry_after="40") as origin:
        allowed = f"127.0.0.1:{image_server.port},127.0.0.1:{origin.port}"
        service = start_service(ALLOW_PRIVATE_HOSTS=allowed)
        accepted = service.post(
            "/upload", files={"file": ("p.csv", csv_of([(1, "Throttled", origin.urls(1))]), "text/csv")}
        )
        request_id = accepted.json()["request_id"]
        browser = BrowserPage(chromium, service.base_url)
        browser.page.goto(f"/requests/{request_id}")
        waiting = browser.page.get_by_text(
            re.compile(rf"waiting for 127\.0\.0\.1:{origin.port} \(429, retry in \d+ s\)")
        )
        waiting.wait_for(timeout=30_000)
        seconds = int(re.search(r"retry in (\d+) s", waiting.inner_text())[1])
        assert 30 <= seconds <= 40
        assert browser.errors == []


def _status_when_finished(service, request_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        body = service.get(f"/status/{request_id}").json()
        if body["status"] not in ("pending", "processing"):
            return body
        assert time.monotonic() < deadline, body["progress"]
        time.sleep(0.1)


@pytest.mark.slow
@needs_chromium
def test_options_through_the_page_with_the_apis_messages_beside_the_fields(
    chromium, start_service, image_server, tmp_path
):
    service = start_service(JPEG_QUALITY="70", JPEG_PROGRESSIVE="true")
    browser = BrowserPage(chromium, service.base_url)
    page = browser.page
    url = image_server.add(corpus.phone_heic(), content_type="image/heic")
    page.goto("/")
    assert page.get_by_label("Quality").input_value() == "70"
    assert page.get_by_label("Format").input_value() == "jpeg"
    assert not page.get_by_label("Keep an input that is already smaller").is_checked()
    assert page.get_by_label("Progressive JPEG").is_checked()  # JPEG_PROGRESSIVE

    # The sample CSV downloads as a file with the columns the page asks for.
    with page.expect_download() as download:
        page.get_by_role("link", name="download a sample CSV").click()
    sample = download.value
    assert sample.suggested_filename == "sample-products.csv"
    assert Path(sample.path()).read_text().splitlines()[0] == "S. No.,Product Name,Input Image Urls"

    page.get_by_label("CSV file").set_input_files(write_csv(tmp_path, [(1, "Phone photo", [url])]))
    page.get_by_label("Quality").fill("100")
    page.get_by_label("Largest width").fill("0")
    page.get_by_role("button", name="Upload").click()
    quality_problem = page.locator("#quality-problem")
    quality_problem.wait_for()
    assert quality_problem.inner_text() == "'100' is not a whole number from 1 to 95."
    assert page.locator("#max_width-problem").inner_text() == "'0' is not a whole number from 1 to 20000."
    assert page.get_by_label("Quality").get_attribute("aria-invalid") == "true"
    assert page.locator("#max_height-problem").is_hidden()
    assert service.get("/requests").json()["items"] == []  # nothing was stored

    page.get_by_label("Quality").fill("80")
    page.get_by_label("Largest width").fill("200")
    page.get_by_label("Format").select_option("webp")
    page.get_by_label("Progressive JPEG").uncheck()  # sent as false, not left to the default
    page.get_by_role("button", name="Upload").click()
    page.wait_for_url(re.compile(r"/requests/[0-9a-f-]{36}$"))
    status = _status_when_finished(service, page.url.rsplit("/", 1)[1])
    assert status["options"] == {
        "quality": 80,
        "format": "webp",
        "max_width": 200,
        "max_height": None,
        "keep_smaller": False,
        "progressive": False,
    }
    (image,) = status["products"][0]["images"]
    assert image["status"] == "succeeded", image
    output = Image.open(io.BytesIO(service.get(image["output_url"].removeprefix(service.base_url)).content))
    # The phone photo (stored sideways, 300x600 as shown) fitted into 200 px of width.
    assert (output.format, output.size) == ("WEBP", (200, 400))
    assert browser.errors_besides(422) == []
