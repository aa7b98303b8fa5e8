"""Uploads: tolerant of harmless variation, clear 4xx answers for everything else."""

import io
import re
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from app.db.models import Image, Product
from app.db.session import build_engine
from app.main import create_app
from app.net.urls import _url_pattern, url_list_is_fine, url_problem
from app.services.csv_checks import CsvLimits, most_rows
from app.services.csv_input import READ_BLOCK_BYTES, CsvErrors, CsvTooLarge, _decoded_lines, read_products
from tests.conftest import csv_of, upload
from tests.support import images

HEADER = "S. No.,Product Name,Input Image Urls"
URL = "https://images.example.com/a.jpg"


def parse(data: bytes, **limits):
    errors = CsvErrors()
    options = {"max_bytes": 10_000_000, "max_line_bytes": 1 << 20, "max_rows": 1000, "max_urls_per_row": 50}
    options |= limits
    rows = list(read_products(io.BytesIO(data), errors=errors, **options))
    return rows, errors


@pytest.mark.parametrize(
    "data",
    [
        f"{HEADER}\n1,Shirt,{URL}\n".encode(),
        f"\ufeff{HEADER}\r\n1,Shirt,{URL}\r\n".encode(),
        f" S. No. , Product Name ,  Input Image Urls \n 1 , Shirt ,  {URL}  \n".encode(),
        f'{HEADER}\n1,Shirt,"{URL}, {URL}?b=2"\n\n'.encode(),
        f"{HEADER}\r1,Shirt,{URL}\r".encode(),
    ],
)
def test_harmless_variations_parse(data):
    rows, errors = parse(data)
    assert not errors, errors.items
    assert rows[0].serial_number == 1 and rows[0].product_name == "Shirt"
    assert rows[0].image_urls[0] == URL


def test_non_ascii_names_and_quoted_commas_survive():
    name = 'Café "Crème", 東京 ✓'
    data = f'{HEADER}\n7,"{name.replace(chr(34), chr(34) * 2)}","{URL},{URL}?x=1"\n'.encode()
    rows, errors = parse(data)
    assert not errors
    assert rows[0].product_name == name
    assert rows[0].image_urls == [URL, URL + "?x=1"]


def test_block_boundaries_do_not_split_lines():
    lines = [f"{n},Product {n} {'é' * (n % 7)},{URL}?n={n}" for n in range(1, 3000)]
    data = ("\r\n".join([HEADER, *lines]) + "\r\n").encode()
    rows, errors = parse(data, max_rows=5000)
    assert not errors
    assert [row.serial_number for row in rows] == list(range(1, 3000))


BAD_FILES = {
    "empty": (b"", None),
    "header only": (f"{HEADER}\n".encode(), None),
    "missing column": (b"S. No.,Product Name\n1,Shirt\n", 1),
    "unknown column": (f"{HEADER},Colour\n1,Shirt,{URL},red\n".encode(), 1),
    "wrong column count": (f"{HEADER}\n1,Shirt,{URL},extra\n".encode(), 2),
    "no urls": (f"{HEADER}\n1,Shirt,\n".encode(), 2),
    "file url": (f"{HEADER}\n1,Shirt,file:///etc/passwd\n".encode(), 2),
    "ftp url": (f"{HEADER}\n1,Shirt,ftp://example.com/a.jpg\n".encode(), 2),
    "javascript url": (f"{HEADER}\n1,Shirt,javascript:alert(1)\n".encode(), 2),
    "data url": (f"{HEADER}\n1,Shirt,data:image/png;base64,AAAA\n".encode(), 2),
    "bare word": (f"{HEADER}\n1,Shirt,picture\n".encode(), 2),
    "long url": (f"{HEADER}\n1,Shirt,https://example.com/{'a' * 2100}\n".encode(), 2),
    "serial not a number": (f"{HEADER}\nabc,Shirt,{URL}\n".encode(), 2),
    "serial zero": (f"{HEADER}\n0,Shirt,{URL}\n".encode(), 2),
    "serial negative": (f"{HEADER}\n-3,Shirt,{URL}\n".encode(), 2),
    "duplicate serial": (f"{HEADER}\n1,Shirt,{URL}\n1,Hat,{URL}\n".encode(), 3),
    "empty name": (f"{HEADER}\n1,,{URL}\n".encode(), 2),
    "not utf-8": (f"{HEADER}\n1,Caf".encode() + b"\xe9," + URL.encode() + b"\n", 2),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", None),
    "unclosed quote": (f'{HEADER}\n1,"Shirt,{URL}\n'.encode(), None),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_csvs_are_refused_with_the_line_and_nothing_is_stored(client, name):
    data, line = BAD_FILES[name]
    response = upload(client, data)
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422 and problem["errors"]
    if line is not None:
        assert problem["errors"][0]["line"] == line
    assert client.get("/requests").json()["items"] == []


def test_every_bad_row_is_reported_up_to_a_bound(client):
    rows = "".join(f"{n},Shirt,not-a-url\n" for n in range(1, 201))
    problem = upload(client, f"{HEADER}\n{rows}".encode()).json()
    assert len(problem["errors"]) == 50
    assert problem["errors_not_shown"] == 150
    assert [error["line"] for error in problem["errors"][:3]] == [2, 3, 4]
    assert problem["errors"][0]["column"] == "Input Image Urls"


def test_limits_on_rows_and_urls(make_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(max_rows=2, max_urls_per_row=2))) as client:
        many_rows = f"{HEADER}\n" + "".join(f"{n},S,{URL}\n" for n in range(1, 4))
        assert upload(client, many_rows.encode()).status_code == 422
        many_urls = f'{HEADER}\n1,S,"{URL},{URL},{URL}"\n'
        problem = upload(client, many_urls.encode()).json()
        assert "at most 2" in problem["errors"][0]["message"]


def test_oversize_csv_is_a_413_problem(make_settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(max_csv_bytes=1000))) as client:
        body = f"{HEADER}\n" + "".join(f"{n},S,{URL}\n" for n in range(1, 40))
        assert 1000 < len(body) < 64 * 1024  # passes the body limit, caught while parsing
        response = upload(client, body.encode())
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        huge = upload(client, b"x" * 200_000)
        assert huge.status_code == 413
        assert huge.headers["content-type"] == "application/problem+json"
        assert client.get("/requests").json()["items"] == []


def test_parser_stops_reading_past_the_byte_limit():
    with pytest.raises(CsvTooLarge):
        parse(f"{HEADER}\n".encode() + b"1,a,b\n" * 100_000, max_bytes=10_000)


def test_missing_file_field_is_a_problem(client):
    response = client.post("/upload", data={"webhook_url": "https://example.com/hook"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("hook", ["ftp://example.com/hook", "javascript:alert(1)", "not a url"])
def test_webhook_url_must_be_http(client, hook):
    response = upload(client, f"{HEADER}\n1,Shirt,{URL}\n".encode(), webhook_url=hook)
    assert response.status_code == 422
    assert "webhook_url" in response.json()["detail"]
    assert client.get("/requests").json()["items"] == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_yield_errors(data):
    rows, errors = parse(data)
    assert rows or errors


csv_cells = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(csv_cells, min_size=0, max_size=5), max_size=6))
def test_any_table_parses_or_yields_errors(table):
    import csv

    buffer = io.StringIO()
    csv.writer(buffer).writerows([["S. No.", "Product Name", "Input Image Urls"], *table])
    rows, errors = parse(buffer.getvalue().encode())
    assert rows or errors
    for row in rows:
        assert row.serial_number > 0 and row.product_name and row.image_urls


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_upload_of_any_bytes_is_never_a_server_error(client, data):
    response = upload(client, data)
    assert response.status_code in (202, 413, 422)
    if response.status_code != 202:
        assert response.headers["content-type"] == "application/problem+json"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet='ab é,"\r\n', max_size=12), max_size=12).map("".join),
    st.integers(min_value=1, max_value=9),
)
def test_lines_are_split_the_same_whatever_the_block_size(text, block_bytes):
    import re

    errors = CsvErrors()
    lines = _decoded_lines(
        io.BytesIO(text.encode()),
        max_bytes=10_000,
        max_line_bytes=10_000,
        errors=errors,
        block_bytes=block_bytes,
    )
    assert list(lines) == [line for line in re.findall(r"[^\r\n]*(?:\r\n|\r|\n)|[^\r\n]+$", text)]
    assert not errors


def test_a_long_line_is_refused_as_soon_as_it_passes_the_limit():
    body = io.BytesIO(f"{HEADER}\n1,Shirt,{URL}\n2,Shirt,".encode() + b"x" * 30_000_000 + b"\n")
    errors = CsvErrors()
    rows = list(
        read_products(
            body,
            max_bytes=50_000_000,
            max_line_bytes=1 << 20,
            max_rows=1000,
            max_urls_per_row=50,
            errors=errors,
        )
    )
    assert [row.serial_number for row in rows] == [1]
    assert errors.items == [{"line": 3, "column": None, "message": "the line is longer than 1048576 bytes"}]
    assert body.tell() < (1 << 20) + 2 * READ_BLOCK_BYTES


def test_an_upload_with_a_long_line_gets_a_422_naming_the_line(client):
    # How soon it is refused is measured in bytes read, not seconds (a loaded machine
    # stretches seconds): test_a_long_line_is_refused_as_soon_as_it_passes_the_limit.
    body = f"{HEADER}\n1,Shirt,{URL}\n2,Shirt,".encode() + b"x" * 24_000_000
    response = upload(client, body)
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"line": 3, "column": None, "message": "the line is longer than 1048576 bytes"}
    ]
    assert client.get("/requests").json()["items"] == []


def test_an_upload_beside_a_large_one_being_parsed_answers_at_once(make_settings, image_server, database_url):
    """The large upload holds no database lock while it is parsed (on SQLite the write
    lock is the whole database's), so a small upload sent meanwhile is not held up.

    The small uploads still share the GIL with the parse, which can stretch one to a
    couple of seconds: the large file is big enough to be parsed for longer than that."""
    import threading
    import time

    urls = ",".join(f"http://a.b/{n}" for n in range(16))
    # On PostgreSQL the rows are stored in chunks while the file is read (and rolled back
    # at its bad last row), so an eighth of the file already takes longer than the parse.
    count = 50_000 if database_url.startswith("postgresql") else 400_000
    rows = "".join(f'{n},Product {n},"{urls}"\n' for n in range(1, count))
    large = f"{HEADER}\n{rows}{count},Product,not-a-url\n".encode()
    service_settings = make_settings(max_csv_bytes=len(large) + 1, max_rows=500_000)
    answers = {}
    small = csv_of([(1, "Shirt", [image_server.add(images.jpeg())])])
    seconds, answered_during = [], 0
    with TestClient(create_app(service_settings)) as client:
        large_upload = threading.Thread(target=lambda: answers.setdefault("large", upload(client, large)))
        large_started = time.monotonic()
        large_upload.start()
        while large_upload.is_alive():
            start = time.monotonic()
            response = upload(client, small)
            seconds.append(time.monotonic() - start)
            assert response.status_code == 202, response.text
            answered_during += large_upload.is_alive()
        large_upload.join()
        large_seconds = time.monotonic() - large_started
    assert answers["large"].status_code == 422
    assert answers["large"].json()["errors"][0]["line"] == count + 1
    # Relative, so a loaded machine slows both alike: held up by a lock, a small upload
    # would take about as long as the large one.
    assert max(seconds) < large_seconds / 2, (round(large_seconds, 2), [round(s, 2) for s in seconds])
    # Two in a row: with the lock held while parsing, the first small upload would end
    # with the large one, and the second would start after it.
    assert answered_during >= 2, [round(s, 2) for s in seconds]


def test_names_and_urls_are_stored_exactly_whatever_characters_they_hold(client, image_server):
    """Uploads go in by each database's bulk path (COPY's text format on PostgreSQL, where
    backslashes, tabs and line breaks are escapes): every character comes back as sent."""
    good = image_server.add(images.jpeg((40, 30)))
    names = ["tab\there", "two\nlines", "back\\slash \\N \\.", "cr\rlf", 'quote " and , comma', "ünï ✓"]
    rows = [(n + 1, name, [f"{good}?k={n}&p=a\\b%5C", f"{good}?k={n}&q=\\t"]) for n, name in enumerate(names)]
    accepted = upload(client, csv_of(rows))
    assert accepted.status_code == 202, accepted.text
    body = client.get(f"/status/{accepted.json()['request_id']}").json()
    stored = [
        (item["serial_number"], item["product_name"], [image["input_url"] for image in item["images"]])
        for item in body["products"]
    ]
    assert stored == rows


# URLs built to be valid for url_problem, each with its port (None when it has none); the
# characters a URL may not hold are the separators, whitespace and controls.
_NOT_IN_URLS = st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), exclude_characters=",;")
_REG_NAME = st.text(
    st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), exclude_characters=",;/?#@:[]"),
    min_size=1,
    max_size=10,
)
_IPV6_LITERAL = st.text(alphabet="0123456789abcdefABCDEF:.", min_size=1, max_size=12).map("[{}]".format)
_VALID_PORT = st.one_of(
    st.none(),
    st.integers(1, 9999).map(str),
    st.integers(1, 9999).map(lambda n: f"{n:05d}"),  # leading zeros, still 5 digits
    st.integers(10_000, 65_535).map(str),
)


@st.composite
def _valid_url(draw) -> tuple[str, str | None]:
    scheme = draw(st.sampled_from(["http", "https", "HTTP", "hTTpS"]))
    userinfo = draw(
        st.one_of(
            st.just(""),
            st.text(
                st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), exclude_characters=",;/?#@"),
                max_size=5,
            ),
        )
    )
    userinfo = f"{userinfo}@" if userinfo or draw(st.booleans()) else ""
    host = draw(st.one_of(_REG_NAME, _IPV6_LITERAL))
    port = draw(_VALID_PORT)
    rest = draw(st.one_of(st.just(""), st.tuples(st.sampled_from("/?#"), st.text(_NOT_IN_URLS, max_size=12))))
    return f"{scheme}://{userinfo}{host}{'' if port is None else ':' + port}{''.join(rest)}", port


# Ways to make a valid URL one url_problem refuses, each keeping it one URL of the list.
_BREAKAGES = {
    "scheme": lambda url: "ftp" + url[url.index(":") :],
    "no slashes": lambda url: url.replace("://", ":", 1),
    "control": lambda url: url + "\x01",
    "port 0": lambda url: _with_port(url, "0"),
    "port over 65535": lambda url: _with_port(url, "65536"),
    "5-digit port over 65535": lambda url: _with_port(url, "99999"),
    "port just over 65535": lambda url: _with_port(url, "65600"),
    "6-digit port": lambda url: _with_port(url, "000080"),
    "empty host": lambda url: url.split("://")[0] + ":///x",
    "bracket in host": lambda url: url.split("://")[0] + "://a[b/x",
}


def _with_port(url: str, port: str) -> str:
    return f"{url.split('://')[0]}://h.example:{port}/x"


@st.composite
def _url_list(draw) -> tuple[str, list[str], list[str | None], list[str]]:
    """A cell, its URLs, their ports, and the breakages made (none for most cells)."""
    urls, ports, broken = [], [], []
    separators = st.sampled_from([",", ";", " ", "\n", ",,", ", ", "\t;", "\u3000"])
    cell = draw(st.sampled_from(["", " ", "\n"]))
    for _ in range(draw(st.integers(1, 5))):
        url, port = draw(_valid_url())
        if draw(st.integers(0, 9)) == 0:
            breakage = draw(st.sampled_from(sorted(_BREAKAGES)))
            url, port = _BREAKAGES[breakage](url), None
            broken.append(breakage)
        urls.append(url)
        ports.append(port)
        cell += url + draw(separators)
    return cell, urls, ports, broken


@given(_url_list())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_a_url_list_is_checked_at_once_exactly_when_each_url_passes_one_by_one(url_list):
    """The fast check accepts a cell exactly when url_problem accepts each of its URLs."""
    cell, urls, ports, broken = url_list
    assert [url for url in re.split(r"[\s,;]+", cell) if url] == urls
    one_by_one = [url_problem(url) is None for url in urls]
    assert all(one_by_one) == (not broken), list(zip(urls, one_by_one, strict=True))
    five_digit_port = any(port is not None and int(port) >= 10_000 for port in ports)
    event(f"broken: {bool(broken)}, 5-digit port: {five_digit_port}")
    assert url_list_is_fine(urls, cell) == (not broken)


@pytest.mark.parametrize(
    "port",
    [
        *("1", "09999", "10000", "49999", "59999", "64999", "65499", "65529", "65535"),
        *("0", "00000", "65536", "65540", "65600", "66000", "70000", "99999", "000080"),
    ],
)
def test_a_port_is_checked_at_once_exactly_as_one_by_one(port):
    """Every boundary of the port's digits: accepted from 1 to 65535, leading zeros
    allowed within 5 digits."""
    url = f"http://h.example:{port}/a.jpg"
    accepted = len(port) <= 5 and 0 < int(port) < 65536
    assert (url_problem(url) is None) == accepted
    assert url_list_is_fine([url], url) == accepted


@pytest.mark.parametrize(
    "cell",
    ["https://a.example/x.jpg", " https://a.example/1.jpg,http://b.example:8080/2.png?x=1;\nhttp://[::1]/y "],
)
def test_ordinary_url_lists_are_checked_at_once(cell):
    assert url_list_is_fine([url for url in re.split(r"[\s,;]+", cell) if url], cell)


@pytest.mark.parametrize("problem", ["bad_last_row", "too_large"])
def test_a_problem_after_thousands_of_good_rows_stores_nothing(make_settings, problem):
    """On PostgreSQL rows are sent to the database while the file is still being read."""
    good = "".join(f"{n},Shirt {n},{URL}?n={n}\n" for n in range(1, 5001))
    data = f"{HEADER}\n{good}".encode()
    service_settings = make_settings(max_rows=10_000)
    if problem == "bad_last_row":
        data += b"5001,Shirt,not-a-url\n"
    else:
        service_settings = make_settings(max_rows=10_000, max_csv_bytes=len(data) - 10)
    with TestClient(create_app(service_settings)) as client:
        response = upload(client, data)
        assert response.status_code == (422 if problem == "bad_last_row" else 413), response.text
        assert client.get("/requests").json()["items"] == []
    engine = build_engine(service_settings.database_url)
    with engine.connect() as connection:
        stored = [connection.scalar(select(func.count()).select_from(table)) for table in (Product, Image)]
    engine.dispose()
    assert stored == [0, 0]


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_ids_are_reserved_for_at_least_every_row_and_not_twice_per_crlf(newline):
    data = newline.join([HEADER, *(f"{n},Shirt,{URL}" for n in range(1, 101))]).encode() + b"\n"
    stream = io.BytesIO(b"skipped" + data)
    stream.seek(len(b"skipped"))
    limits = CsvLimits(max_bytes=10_000_000, max_line_bytes=1 << 20, max_rows=1000, max_urls_per_row=50)
    assert 100 <= most_rows(stream, limits) <= 102
    assert stream.tell() == len(b"skipped")
    assert most_rows(io.BytesIO(data), replace(limits, max_rows=10)) == 10


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("http://X.example/X", "X.example", None),
        ("HTTPS://user:pw@Host.Example:8080/p?q=1#f", "Host.Example", "8080"),
        ("http://[::1]:99999", "[::1]", "99999"),  # the range is url_problem's to check
        ("http://h?x", "h", None),
        ("http://@h#", "h", None),
        ("http://a,b;c/x,y", "a,b;c", None),
    ],
)
def test_the_url_grammar_as_built_finds_host_and_port(url, host, port):
    """The grammar _url_pattern builds (the module compiles it once, at import)."""
    match = re.fullmatch("(?i)" + _url_pattern(), url)
    assert match is not None and (match["host"], match["port"]) == (host, port)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://h/x",
        "http:/h/x",
        "http://",
        "http://h:/x",
        "http://h:123456/x",
        "http://h:8o/x",
        "http://h/a b",
        "http://h/\x7f",
        "http://h\x00/x",
        "http://a@b@c/x",
        "http://a[b/x",
        "http://h/x\u3000y",
        " http://h/x",
    ],
)
def test_the_url_grammar_as_built_refuses(url):
    assert re.fullmatch("(?i)" + _url_pattern(), url) is None


def test_the_url_grammar_as_built_keeps_excluded_characters_out_of_every_part():
    grammar = "(?i)" + _url_pattern(",;")
    assert re.fullmatch(grammar, "http://u@h.example:80/p?q#f")
    for url in ("http://a,b/x", "http://u;v@h/x", "http://h/x,y", "http://h/x?a;b", "http://h/#a,"):
        assert re.fullmatch(grammar, url) is None, url
