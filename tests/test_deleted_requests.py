"""Nothing stays stored for a request that no longer exists, and nothing of a deleted
request's images reaches a new request: a stale claim holder (a worker that lost its
lease) can still be fetching, compressing and storing while DELETE runs."""

import threading
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text

from alembic import command
from app.composition import stage_config
from app.db.migrate import alembic_config
from app.db.models import Image, ImageStatus, ProcessingRequest
from app.ledger.units import ImageOutcome, WorkUnit
from app.main import create_app
from app.pipeline.stages import ImageStages
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.servers import send

SOURCE = images.jpeg((400, 300))


class GatedImage:
    """An image URL answered at once the first `free` times, then only once `gate` is set:
    the slow fetch of a claim holder that fell behind."""

    def __init__(self, image_server, free: int = 1):
        self.gate = threading.Event()
        self.waiting = threading.Event()
        self._free = free
        self._lock = threading.Lock()
        self.url = image_server.add_handler(self._answer, ".jpg")

    def _answer(self, request) -> None:
        with self._lock:
            self._free -= 1
            gated = self._free < 0
        if gated:
            self.waiting.set()
            self.gate.wait(30)
        send(request, 200, SOURCE, {"Content-Type": "image/jpeg"})


@pytest.fixture
def app_client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def _finished_request(client: TestClient, url: str) -> tuple[str, WorkUnit]:
    """A completed one-image request, and the unit its first claim held."""
    request_id = upload(client, csv_of([(1, "A", [url])])).json()["request_id"]
    assert wait_finished(client, request_id)["status"] == "completed"
    with client.app.state.sessions() as session:
        request_pk = session.scalar(
            select(ProcessingRequest.id).where(ProcessingRequest.request_id == request_id)
        )
        image = session.execute(select(Image.id, Image.attempts).where(Image.request_pk == request_pk)).one()
    return request_id, WorkUnit(image.id, image.attempts, request_pk, request_id, url)


def _stored_for(media_root, request_id: str) -> list[str]:
    folder = media_root / request_id
    return sorted(path.relative_to(media_root).as_posix() for path in folder.rglob("*") if path.is_file())


def _run_in_thread(stages: ImageStages, unit: WorkUnit) -> tuple[threading.Thread, list[ImageOutcome]]:
    outcomes: list[ImageOutcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(stages.run(unit)))
    thread.start()
    return thread, outcomes


def test_an_output_a_stale_claim_stores_after_the_delete_is_removed_when_recorded(
    app_client, settings, image_server, media_root
):
    slow = GatedImage(image_server)
    request_id, unit = _finished_request(app_client, slow.url)
    stale_worker = ImageStages.from_config(stage_config(settings))
    try:
        thread, outcomes = _run_in_thread(stale_worker, unit)
        assert slow.waiting.wait(10)  # the stale holder is fetching
        assert app_client.delete(f"/requests/{request_id}").status_code == 204
        assert _stored_for(media_root, request_id) == []
        slow.gate.set()
        thread.join(30)
    finally:
        slow.gate.set()
        stale_worker.close()
    (outcome,) = outcomes
    assert outcome.succeeded
    # Stored after the DELETE: output and thumbnail are there until the outcome is recorded.
    assert len(_stored_for(media_root, request_id)) == 2
    assert app_client.app.state.ledger.record_outcomes([outcome]) == []
    assert _stored_for(media_root, request_id) == []
    assert app_client.get(f"/status/{request_id}").status_code == 404


class StoreDuringDelete:
    """The app's storage, whose first delete_prefix lets the stale holder store and record
    its outcome before the DELETE goes on to remove the rows."""

    def __init__(self, storage, go_on):
        self._storage = storage
        self._go_on = go_on
        self.calls = 0

    def delete_prefix(self, key_prefix: str) -> int:
        removed = self._storage.delete_prefix(key_prefix)
        self.calls += 1
        if self.calls == 1:
            self._go_on()
        return removed

    def __getattr__(self, name):
        return getattr(self._storage, name)


def test_an_output_stored_while_delete_runs_does_not_stay(app_client, settings, image_server, media_root):
    slow = GatedImage(image_server)
    request_id, unit = _finished_request(app_client, slow.url)
    stale_worker = ImageStages.from_config(stage_config(settings))
    recorded: list[list[int]] = []
    try:
        thread, outcomes = _run_in_thread(stale_worker, unit)
        assert slow.waiting.wait(10)

        def store_and_record_now() -> None:
            slow.gate.set()
            thread.join(30)
            assert len(_stored_for(media_root, request_id)) == 2  # stored after the first removal
            recorded.append(app_client.app.state.ledger.record_outcomes(outcomes))  # the rows still exist

        storage = StoreDuringDelete(app_client.app.state.storage, store_and_record_now)
        app_client.app.state.storage = storage
        assert app_client.delete(f"/requests/{request_id}").status_code == 204
    finally:
        slow.gate.set()
        stale_worker.close()
    assert recorded == [[]] and outcomes[0].succeeded
    assert _stored_for(media_root, request_id) == []


def test_a_stale_outcome_of_a_deleted_requests_image_changes_nothing_in_a_new_request(
    app_client, image_server
):
    old_request_id, stale_unit = _finished_request(app_client, image_server.add(SOURCE))
    assert app_client.delete(f"/requests/{old_request_id}").status_code == 204

    # The new request's image is claimed (attempt 1) and being fetched when the stale
    # outcome of the deleted request's image arrives.
    slow = GatedImage(image_server, free=0)
    try:
        new_request_id = upload(app_client, csv_of([(1, "B", [slow.url])])).json()["request_id"]
        assert slow.waiting.wait(10)
        stale = ImageOutcome(stale_unit, error_code="not_found", error_message="the source answered 404")
        assert app_client.app.state.ledger.record_outcomes([stale]) == []
        with app_client.app.state.sessions() as session:
            new_image = session.execute(
                select(Image.id, Image.status, Image.error_code)
                .join(ProcessingRequest, ProcessingRequest.id == Image.request_pk)
                .where(ProcessingRequest.request_id == new_request_id)
            ).one()
        assert new_image.id != stale_unit.image_id
        assert (new_image.status, new_image.error_code) == (ImageStatus.PROCESSING, None)
    finally:
        slow.gate.set()
    status = wait_finished(app_client, new_request_id)
    assert status["status"] == "completed"
    assert (status["progress"]["processed_images"], status["progress"]["failed_images"]) == (1, 0)


def test_the_migration_keeps_image_ids_and_never_hands_one_out_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'ids.db'}"
    config = alembic_config(url)
    config.attributes["configure_logging"] = False
    command.upgrade(config, "0011")
    engine = create_engine(url)
    insert = text(
        "INSERT INTO images (request_pk, product_id, position, input_url, status, attempts) "
        "VALUES (1, :product, 0, 'http://127.0.0.1/a.jpg', 'pending', 0)"
    )
    with engine.begin() as connection:
        connection.execute(insert, {"product": 1})
        connection.execute(insert, {"product": 2})
        connection.execute(text("DELETE FROM images WHERE id = 2"))
    command.upgrade(config, "head")
    with engine.begin() as connection:
        assert connection.scalars(text("SELECT id FROM images")).all() == [1]
        connection.execute(insert, {"product": 3})
        connection.execute(text("DELETE FROM images WHERE product_id = 3"))
        connection.execute(insert, {"product": 4})
        # Id 2 went before the migration (SQLite's default then reuses it once); from now
        # on, an id once given is never given again.
        assert connection.scalars(text("SELECT id FROM images ORDER BY id")).all() == [1, 3]
    engine.dispose()
