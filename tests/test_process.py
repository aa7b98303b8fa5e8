"""The unit of work called directly: idempotent, guarded, finishing a request exactly once."""

import io
import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.db.base import utcnow
from app.db.models import Image, ProcessingRequest, WebhookEvent
from app.db.session import build_engine, writer_sessionmaker
from app.main import build_runner, build_stages
from app.services.batches import CsvLimits, create_batch, parse_csv
from tests import images
from tests.conftest import csv_of

LIMITS = CsvLimits(1_000_000, 1 << 20, 1000, 50)


@pytest.fixture
def engine(settings):
    engine = build_engine(settings.database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pipeline(settings, engine):
    stages = build_stages(settings)
    runner, closers = build_runner(settings, engine, stages)
    yield runner.pipeline
    stages.close()
    for close in closers:
        close()


def make_batch(engine, rows, webhook_url=None) -> tuple[int, list[int]]:
    with writer_sessionmaker(engine).begin() as session:
        request = create_batch(
            session, parse_csv(io.BytesIO(csv_of(rows)), LIMITS), webhook_url=webhook_url, owner=None
        )
        image_ids = session.scalars(select(Image.id).where(Image.request_pk == request.id).order_by(Image.id))
        return request.id, list(image_ids)


def request_row(engine, request_pk) -> ProcessingRequest:
    with writer_sessionmaker(engine)() as session:
        return session.get(ProcessingRequest, request_pk)


def event_count(engine, request_pk) -> int:
    with writer_sessionmaker(engine)() as session:
        return session.scalar(select(func.count()).where(WebhookEvent.request_pk == request_pk))


def test_processing_an_image_twice_changes_nothing_the_second_time(
    engine, pipeline, image_server, media_root
):
    request_pk, (image_id,) = make_batch(
        engine, [(1, "A", [image_server.add(images.jpeg())])], "https://h.example/x"
    )
    first = pipeline.process_image(image_id)
    second = pipeline.process_image(image_id)
    assert len(first) == 1 and second == []
    request = request_row(engine, request_pk)
    assert (request.processed_images, request.failed_images, request.status) == (1, 0, "completed")
    assert event_count(engine, request_pk) == 1
    assert len(list(media_root.rglob("*.jpg"))) == 1


def test_recording_the_same_outcome_twice_counts_once(engine, pipeline, image_server):
    request_pk, ids = make_batch(
        engine, [(1, "A", [image_server.add(images.jpeg()), image_server.add(images.jpeg())])]
    )
    units = pipeline.claim_images(ids)
    outcome = pipeline.stages.run(units[0])
    pipeline.record_outcomes([outcome])
    pipeline.record_outcomes([outcome])
    request = request_row(engine, request_pk)
    assert (request.processed_images, request.status) == (1, "processing")


def test_a_late_result_from_a_lost_lease_is_ignored(engine, pipeline, image_server, settings):
    request_pk, (image_id,) = make_batch(engine, [(1, "A", [image_server.add(images.jpeg())])])
    (stale,) = pipeline.claim_images([image_id])
    assert pipeline.claim_images([image_id]) == []  # lease still held
    with writer_sessionmaker(engine).begin() as session:  # the lease runs out
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
        )
    (fresh,) = pipeline.claim_images([image_id])
    assert fresh.attempt == stale.attempt + 1
    pipeline.record_outcomes([pipeline.stages.run(stale)])
    assert request_row(engine, request_pk).processed_images == 0
    pipeline.record_outcomes([pipeline.stages.run(fresh)])
    request = request_row(engine, request_pk)
    assert (request.processed_images, request.status) == (1, "completed")


def test_concurrent_last_images_finish_the_request_exactly_once(engine, pipeline, image_server):
    url = image_server.add(images.jpeg((16, 16)))
    request_pk, ids = make_batch(engine, [(n, f"P{n}", [url]) for n in range(1, 41)], "https://h.example/x")
    outcomes = [pipeline.stages.run(unit) for unit in pipeline.claim_images(ids)]
    events: list[int] = []
    barrier = threading.Barrier(8)

    def record(chunk):
        barrier.wait()
        for outcome in chunk:
            events.extend(pipeline.record_outcomes([outcome]))

    threads = [threading.Thread(target=record, args=(outcomes[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    request = request_row(engine, request_pk)
    assert (request.processed_images, request.status) == (40, "completed")
    assert request.completed_at is not None
    assert len(events) == 1
    assert event_count(engine, request_pk) == 1


def test_released_units_go_back_to_pending(engine, pipeline, image_server):
    _, (image_id,) = make_batch(engine, [(1, "A", [image_server.add(images.jpeg())])])
    units = pipeline.claim_images([image_id])
    pipeline.release(units)
    assert [unit.image_id for unit in pipeline.claim_images([image_id])] == [image_id]


def test_renewed_leases_are_not_taken_back(engine, pipeline, image_server, settings):
    _, (image_id,) = make_batch(engine, [(1, "A", [image_server.add(images.jpeg())])])
    units = pipeline.claim_images([image_id])
    with writer_sessionmaker(engine).begin() as session:
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
        )
    pipeline.renew_leases(units)
    assert pipeline.claim_images([image_id]) == []
