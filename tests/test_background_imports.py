"""Large uploads are answered once checked and stored after the answer (`importing`):
they end as an upload stored first would, a bad row still stores nothing, a cancel stops
the import, a restart resumes it without doubling a row, and an import whose file is lost
is cancelled by the sweep."""

import io
import threading
import time
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.db.base import utcnow
from app.db.models import Image, ImageStatus, ProcessingRequest, Product
from app.db.session import build_engine, writer_sessionmaker
from app.main import create_app
from app.services import imports
from app.services.batches import BackgroundImports, create_batch
from app.services.csv_checks import CsvLimits
from app.services.imports import import_request, spool_path
from app.services.lifecycle import STALLED_IMPORT_SECONDS, purge_expired
from tests.conftest import csv_of, upload, wait_finished
from tests.support.images import jpeg

LIMITS = CsvLimits(max_bytes=1 << 30, max_line_bytes=1 << 20, max_rows=1_000_000, max_urls_per_row=50)


@pytest.fixture
def sources(image_server) -> list[str]:
    return [image_server.add(jpeg((40 + n, 30))) for n in range(6)]


def _rows(sources: list[str], count: int) -> list[tuple[int, str, list[str]]]:
    # Every third row names the first source again: copies across chunks.
    return [(n, f"Product {n}", [sources[n % len(sources)], sources[0]]) for n in range(1, count + 1)]


def _importing_request(settings, rows) -> tuple[object, int, str]:
    """An upload stored as a background import would be, before its import runs."""
    engine = build_engine(settings.database_url)
    with Session(engine) as session, session.begin():
        request = create_batch(
            session,
            io.BytesIO(csv_of(rows)),
            LIMITS,
            webhook_url=None,
            owner=None,
            background=BackgroundImports(1, settings.import_dir),
        )
        assert request.status == "importing"
        request_pk, request_id = request.id, request.request_id
    return engine, request_pk, request_id


def _counts(body: dict) -> tuple[int, int, int]:
    """Products the request holds, those stored so far, and images."""
    return body["total_products"], body["stored_products"], body["progress"]["total_images"]


def _stored(engine, request_pk: int) -> tuple[int, int, list[int]]:
    with Session(engine) as session:
        products = session.scalar(select(func.count()).where(Product.request_pk == request_pk))
        images = session.scalar(select(func.count()).where(Image.request_pk == request_pk))
        serials = session.scalars(
            select(Product.serial_number).where(Product.request_pk == request_pk).order_by(Product.id)
        ).all()
    return products, images, serials


def test_a_large_upload_is_answered_importing_and_ends_as_an_upload_stored_first(
    make_settings, sources, image_server, monkeypatch
):
    monkeypatch.setattr(imports, "IMPORT_CHUNK_ROWS", 4)  # 3 chunks and a bit
    settings = make_settings(background_import_rows=5)
    rows = _rows(sources, 14)
    with TestClient(create_app(settings)) as client:
        accepted = upload(client, csv_of(rows))
        assert accepted.status_code == 202, accepted.text
        answer = accepted.json()
        assert answer["status"] == "importing"
        assert (answer["total_products"], answer["total_images"]) == (14, 28)
        body = wait_finished(client, answer["request_id"])
        assert body["status"] == "completed", body
        assert _counts(body) == (14, 14, 28)
        assert body["progress"]["succeeded_images"] == 28
        assert [p["serial_number"] for p in body["products"]] == list(range(1, 15))
        for product, (_serial, _name, urls) in zip(body["products"], rows, strict=True):
            assert [image["input_url"] for image in product["images"]] == urls
            assert all(image["output_url"] for image in product["images"])
    # A URL named by many rows, across chunks, is fetched once: the others are its copies.
    assert image_server.hits_for(sources[0]) == 1
    assert not any(settings.import_dir.iterdir())


def test_a_small_upload_is_still_stored_before_its_answer(make_settings, sources):
    settings = make_settings(background_import_rows=5)
    with TestClient(create_app(settings)) as client:
        accepted = upload(client, csv_of(_rows(sources, 4)))
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["status"] == "pending"
        assert wait_finished(client, accepted.json()["request_id"])["status"] == "completed"


def test_a_bad_row_near_the_end_of_a_large_upload_is_a_422_and_leaves_nothing(make_settings, sources):
    settings = make_settings(background_import_rows=5)
    data = csv_of(_rows(sources, 40)) + b"41,Broken,ftp://example.com/a.jpg\n"
    with TestClient(create_app(settings)) as client:
        refused = upload(client, data)
        assert refused.status_code == 422, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert refused.json()["errors"][0]["line"] == 42
        assert client.get("/requests").json()["items"] == []
    assert not any(settings.import_dir.iterdir())


def test_a_cancel_while_importing_stops_the_import_and_ends_cancelled(make_settings, sources):
    settings = make_settings()
    engine, request_pk, request_id = _importing_request(settings, _rows(sources, 9))
    sessions = writer_sessionmaker(engine)
    cancelled = {}

    def cancel_after_the_first_chunk(stored: int) -> None:
        if not cancelled:
            cancelled["answer"] = client.post(f"/requests/{request_id}/cancel")

    # The app imports from a folder of its own: this test's import runs here, chunk by chunk.
    elsewhere = settings.model_copy(update={"import_dir": settings.import_dir / "elsewhere"})
    with TestClient(create_app(elsewhere)) as client:
        imported = import_request(
            sessions,
            settings.import_dir,
            request_pk,
            request_id,
            stopping=threading.Event(),
            chunk_rows=4,
            on_chunk_stored=cancel_after_the_first_chunk,
        )
        assert not imported
        assert cancelled["answer"].status_code == 202, cancelled["answer"].text
        body = wait_finished(client, request_id)
    assert body["status"] == "cancelled"
    # What the first chunk stored is all the request holds, cancelled, and it says so.
    assert _stored(engine, request_pk)[:2] == (4, 8)
    assert _counts(body) == (4, 4, 8)
    assert body["progress"]["cancelled_images"] == 8
    assert not spool_path(settings.import_dir, request_id).exists()
    engine.dispose()


def test_an_interrupted_import_is_resumed_at_the_next_start_without_doubling_a_row(make_settings, sources):
    settings = make_settings()
    rows = _rows(sources, 10)
    engine, request_pk, request_id = _importing_request(settings, rows)
    stopping = threading.Event()
    imported = import_request(
        writer_sessionmaker(engine),
        settings.import_dir,
        request_pk,
        request_id,
        stopping=stopping,
        chunk_rows=3,
        on_chunk_stored=lambda stored: stopping.set(),  # a stop after the first chunk
    )
    assert not imported
    assert _stored(engine, request_pk)[:2] == (3, 6)
    assert spool_path(settings.import_dir, request_id).exists()
    with TestClient(create_app(settings)) as client:
        body = wait_finished(client, request_id)
    assert body["status"] == "completed", body
    products, images, serials = _stored(engine, request_pk)
    assert (products, images, serials) == (10, 20, list(range(1, 11)))
    assert body["progress"]["succeeded_images"] == 20
    assert not spool_path(settings.import_dir, request_id).exists()
    engine.dispose()


def test_an_import_whose_file_is_lost_waits_unserved_until_the_sweep_cancels_it(make_settings, sources):
    settings = make_settings()
    engine, request_pk, request_id = _importing_request(settings, _rows(sources, 6))
    stopping = threading.Event()
    import_request(
        writer_sessionmaker(engine),
        settings.import_dir,
        request_pk,
        request_id,
        stopping=stopping,
        chunk_rows=2,
        on_chunk_stored=lambda stored: stopping.set(),
    )
    spool_path(settings.import_dir, request_id).unlink()  # its server's disk, gone
    with TestClient(create_app(settings)) as client:
        body = client.get(f"/status/{request_id}").json()
        assert body["status"] == "importing"
        assert _counts(body) == (6, 2, 12)
        # The runner serves other requests and not this one: a later upload finishes
        # while the importing request's stored images stay pending.
        later = upload(client, csv_of([(1, "Later", [sources[1] + "?later"])])).json()["request_id"]
        assert wait_finished(client, later)["status"] == "completed"
        with Session(engine) as session:
            statuses = session.scalars(select(Image.status).where(Image.request_pk == request_pk)).all()
        assert statuses == [ImageStatus.PENDING] * 4
        app = client.app
        # Not stalled yet: the sweep leaves it.
        purge_expired(app.state.writer_sessions, app.state.storage, retention_days=0, ledger=app.state.ledger)
        assert client.get(f"/status/{request_id}").json()["status"] == "importing"
        _age_import(engine, request_pk, STALLED_IMPORT_SECONDS + 60)
        purge_expired(app.state.writer_sessions, app.state.storage, retention_days=0, ledger=app.state.ledger)
        body = wait_finished(client, request_id)
    assert body["status"] == "cancelled"
    assert _counts(body) == (2, 2, 4)
    assert body["progress"]["cancelled_images"] == 4
    engine.dispose()


def _age_import(engine, request_pk: int, seconds: float) -> None:
    with Session(engine) as session, session.begin():
        session.execute(
            update(ProcessingRequest)
            .where(ProcessingRequest.id == request_pk)
            .values(import_progress_at=utcnow() - timedelta(seconds=seconds))
        )


def test_a_stop_during_an_import_leaves_it_to_the_next_start(make_settings, sources, monkeypatch):
    """The import process stops at the end of its chunk when the service stops; the
    file stays, and the next start imports the request again, whole."""
    monkeypatch.setattr(imports, "IMPORT_CHUNK_ROWS", 1)  # a transaction a row: seconds
    settings = make_settings(background_import_rows=5)
    rows = [(n, f"Product {n}", [f"{sources[n % len(sources)]}?n={n}"]) for n in range(1, 1501)]
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of(rows)).json()["request_id"]
        deadline = time.monotonic() + 60
        while client.get(f"/status/{request_id}").json()["stored_products"] == 0:
            assert time.monotonic() < deadline, "the import stored nothing"
            time.sleep(0.05)
    engine = build_engine(settings.database_url)
    with Session(engine) as session:
        status, stored = session.execute(
            select(ProcessingRequest.status, ProcessingRequest.total_products).where(
                ProcessingRequest.request_id == request_id
            )
        ).one()
    assert status == "importing" and 0 < stored < 1500
    assert spool_path(settings.import_dir, request_id).exists()
    monkeypatch.setattr(imports, "IMPORT_CHUNK_ROWS", 1000)
    with TestClient(create_app(settings)) as client:
        body = wait_finished(client, request_id, timeout=120)
    assert body["status"] == "completed", body["progress"]
    assert _counts(body) == (1500, 1500, 1500)
    assert body["progress"]["succeeded_images"] == 1500
    engine.dispose()


def test_an_import_folder_that_cannot_be_written_is_a_503_and_stores_nothing(
    make_settings, sources, tmp_path
):
    not_a_folder = tmp_path / "imports-is-a-file"
    not_a_folder.write_text("")
    settings = make_settings(background_import_rows=5, import_dir=not_a_folder)
    with TestClient(create_app(settings)) as client:
        refused = upload(client, csv_of(_rows(sources, 10)))
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "could not be kept for its import" in refused.json()["detail"]
        assert str(tmp_path) not in refused.text
        assert client.get("/requests").json()["items"] == []
