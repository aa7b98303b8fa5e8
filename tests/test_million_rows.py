"""Large catalogues: an upload's memory does not grow with its rows (they go to the
database in chunks as they are read), repeated URLs are found across chunks, and a
problem anywhere stores nothing."""

import io
import socket
import threading
import time
import tracemalloc
import uuid
from unittest.mock import ANY

import pytest
import requests
import uvicorn
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db.models import Image, ImageStatus, ProcessingRequest, Product
from app.db.session import build_engine
from app.errors import InvalidCsv
from app.main import create_app
from app.services.batches import create_batch
from app.services.bulk_insert import RepeatedUrls, insert_rows, link_copies
from app.services.csv_checks import CsvLimits
from app.services.csv_input import SerialNumbers
from tests.support.images import jpeg

HEADER = "S. No.,Product Name,Input Image Urls"

LIMITS = CsvLimits(max_bytes=1 << 30, max_line_bytes=1 << 20, max_rows=1_000_000, max_urls_per_row=50)


def _stored_images(session: Session, request_pk: int) -> list:
    return session.execute(
        select(Image.id, Image.input_url, Image.status, Image.source_image_id, Image.copies)
        .where(Image.request_pk == request_pk)
        .order_by(Image.id)
    ).all()


def test_repeated_urls_become_copies_of_their_first_image_across_chunks(database_url):
    """The smallest filter flags many URLs that are not repeated (they share a slot): only
    real repeats become copies, each of the first image naming its URL, which counts them."""
    rows = [
        (n, f"P{n}", f"https://a.example/{n % 700}.jpg\nhttps://b{n % 3}.example/{n}.jpg")
        for n in range(1, 3001)
    ]
    engine = build_engine(database_url)
    with Session(engine) as session, session.begin():
        request = ProcessingRequest(request_id=str(uuid.uuid4()), status="pending")
        session.add(request)
        session.flush()
        hosts: set[str] = set()
        repeated = RepeatedUrls(0)
        insert_rows(session.connection(), request.id, rows, len(rows), hosts, repeated, chunk_rows=250)
        link_copies(session.connection(), request.id, repeated.flagged)
        stored = _stored_images(session, request.id)
        products = session.scalar(select(func.count()).where(Product.request_pk == request.id))
    engine.dispose()
    assert products == 3000 and len(stored) == 6000
    assert hosts == {"a.example", "b0.example", "b1.example", "b2.example"}
    repeats = {url for url in repeated.flagged if url.startswith("https://a.")}
    assert len(repeated.flagged) > len(repeats) == 700  # the filter flagged unrepeated URLs too
    first = {}
    for image in stored:
        first.setdefault(image.input_url, image)
    for image in stored:
        source = first[image.input_url]
        if image is source:
            named = sum(1 for other in stored if other.input_url == image.input_url)
            assert (image.status, image.source_image_id, image.copies) == (
                ImageStatus.PENDING,
                None,
                named - 1,
            )
        else:
            assert (image.status, image.source_image_id, image.copies) == (ImageStatus.COPY, source.id, 0)


def _csv(rows: int, bad_line: int | None = None) -> bytes:
    lines = [HEADER]
    for n in range(1, rows + 1):
        urls = ",".join(f"https://img{n % 5}.example/p/{n}-{k}.jpg" for k in range(3))
        lines.append(f'{n},Product {n},"{urls}"' if n + 1 != bad_line else f"{n},Product {n},not-a-url")
    return ("\n".join(lines) + "\n").encode()


def _upload_peak_bytes(database_url: str, data: bytes) -> tuple[int, ProcessingRequest]:
    engine = build_engine(database_url)
    tracemalloc.start()
    try:
        with Session(engine) as session, session.begin():
            request = create_batch(
                session, io.BytesIO(data), LIMITS, webhook_url=None, owner=None, chunk_rows=2000
            )
            session.expunge(request)
        return tracemalloc.get_traced_memory()[1], request
    finally:
        tracemalloc.stop()
        engine.dispose()


def test_an_upload_holds_a_chunk_of_its_rows_not_the_file(database_url):
    """The Python memory an upload peaks at grows far less than its file: the rows are
    stored a chunk at a time, and repeated URLs are looked for in a filter of a bit per
    slot, not in a set of every URL."""
    small, large = _csv(5_000), _csv(30_000)
    small_peak, _ = _upload_peak_bytes(database_url, small)
    large_peak, request = _upload_peak_bytes(database_url, large)
    assert (request.total_products, request.total_images) == (30_000, 90_000)
    # The filter is sized from the file (a bit for each of its bytes or two, at most 32 MiB).
    filters = len(RepeatedUrls(len(large)).slots) - len(RepeatedUrls(len(small)).slots)
    # Holding the rows (or a set of the URLs) would cost more than the file itself.
    growth = large_peak - small_peak - filters
    assert growth < (len(large) - len(small)) / 5, (small_peak, large_peak, filters, len(large))


def test_serial_numbers_are_told_apart_in_any_order():
    numbers = SerialNumbers()
    added = [numbers.add(serial) for serial in (1, 2, 5, 3, 5, 3, 4, 9, 1, 4, 2**31 - 1, 2**31 - 1)]
    assert added == [True, True, True, True, False, False, True, True, False, False, True, False]


def _stored_rows(database_url: str) -> list[int]:
    engine = build_engine(database_url)
    with engine.connect() as connection:
        counts = [
            connection.scalar(select(func.count()).select_from(table))
            for table in (ProcessingRequest, Product, Image)
        ]
    engine.dispose()
    return counts


def test_a_bad_row_after_many_chunks_names_its_line_and_stores_nothing(database_url):
    data = _csv(9_000, bad_line=8_990)
    engine = build_engine(database_url)
    with Session(engine) as session:
        with pytest.raises(InvalidCsv) as refused:
            create_batch(session, io.BytesIO(data), LIMITS, webhook_url=None, owner=None, chunk_rows=1000)
        # What the request dependency does with an error: roll back.
        session.rollback()
    engine.dispose()
    assert refused.value.extra["errors"] == [{"line": 8_990, "column": "Input Image Urls", "message": ANY}]
    assert _stored_rows(database_url) == [0, 0, 0]


def test_an_upload_whose_client_goes_away_half_way_stores_nothing(settings):
    """The body is received whole (spooled to a temporary file) before anything is
    stored: a client that stops sending stores nothing, and the service goes on."""
    data = _csv(20_000)
    boundary = "million-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not (server.started and server.servers):
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as connection:
            connection.sendall(
                f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
            )
            connection.sendall(body[: len(body) // 2])
        time.sleep(1)
        assert _stored_rows(settings.database_url) == [0, 0, 0]
        # The service goes on: the same upload, whole, is stored.
        accepted = requests.post(
            f"http://127.0.0.1:{port}/upload", files={"file": ("p.csv", data, "text/csv")}, timeout=60
        )
        assert accepted.status_code == 202, accepted.text
        assert _stored_rows(settings.database_url) == [1, 20_000, 60_000]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.slow
def test_an_import_cut_by_a_sigkill_of_the_api_ends_whole_once_it_starts_again(deploy, image_server):
    """The API dies mid-import: its import process stops at the end of its chunk (it is
    told when its parent dies), and the API started again imports the request from its
    file, whole: every row once, every image processed."""
    deployment = deploy("inprocess", BACKGROUND_IMPORT_ROWS="5")
    sources = [image_server.add(jpeg((16 + n, 16))) for n in range(20)]
    rows = 120_000
    data = f"{HEADER}\n" + "".join(f"{n},P{n},{sources[n % 20]}\n" for n in range(1, rows + 1))
    accepted = deployment.api.post("/upload", files={"file": ("p.csv", data.encode(), "text/csv")})
    assert accepted.status_code == 202 and accepted.json()["status"] == "importing", accepted.text
    request_id = accepted.json()["request_id"]
    deadline = time.monotonic() + 120
    while (state := deployment.request_state(request_id)).total == 0:
        assert time.monotonic() < deadline and state.status == "importing", state
        time.sleep(0.05)
    deployment.kill_api()
    assert deployment.request_state(request_id).status == "importing"

    deployment.start_api()
    final = deployment.wait_done(request_id, timeout=300)

    assert (final.status, final.total, final.processed) == ("completed", rows, rows)
    engine = build_engine(deployment.database_url)
    with engine.connect() as connection:
        request_pk = connection.scalar(
            select(ProcessingRequest.id).where(ProcessingRequest.request_id == request_id)
        )
        stored = connection.execute(
            select(func.count(), func.count(func.distinct(Product.serial_number))).where(
                Product.request_pk == request_pk
            )
        ).one()
    engine.dispose()
    assert tuple(stored) == (rows, rows)
    # One download per distinct URL: the other rows are copies of the first naming it.
    assert all(image_server.hits_for(url) == 1 for url in sources)
