"""The unit of work called directly: idempotent, guarded, finishing a request exactly once."""

import io
import json
import logging
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text, update

from app.composition import build_parts, stage_config
from app.db.base import utcnow
from app.db.models import Image, ProcessingRequest, WebhookEvent
from app.db.session import writer_sessionmaker
from app.ledger.image_ledger import Cancellation, FailedImagesRetry
from app.ledger.turns import next_claimable_ids, seconds_until_next_retry
from app.ledger.units import EncodingKeys, OutputOptions
from app.pipeline.stages import ImageStages
from app.services.batches import create_batch
from app.services.csv_checks import CsvLimits
from app.tasks import MAX_WORKER_CRASHES, process_image
from tests.conftest import csv_of
from tests.support import images
from tests.support.deployment import test_database_is_postgres as on_postgres
from tests.support.storage import FillableStorage

LIMITS = CsvLimits(1_000_000, 1 << 20, 1000, 50)


@pytest.fixture
def services(settings):
    services = build_parts(settings, runs_images=True)
    yield services
    services.close()


@pytest.fixture
def engine(services):
    return services.engine


def make_batch(engine, rows, webhook_url=None) -> tuple[int, list[int]]:
    with writer_sessionmaker(engine).begin() as session:
        request = create_batch(session, io.BytesIO(csv_of(rows)), LIMITS, webhook_url=webhook_url, owner=None)
        image_ids = session.scalars(select(Image.id).where(Image.request_pk == request.id).order_by(Image.id))
        return request.id, list(image_ids)


def request_row(engine, request_pk) -> ProcessingRequest:
    with writer_sessionmaker(engine)() as session:
        return session.get(ProcessingRequest, request_pk)


def event_count(engine, request_pk) -> int:
    with writer_sessionmaker(engine)() as session:
        return session.scalar(select(func.count()).where(WebhookEvent.request_pk == request_pk))


def test_processing_an_image_twice_changes_nothing_the_second_time(
    engine, services, image_server, media_root
):
    other_pk, _ = make_batch(engine, [(1, "B", [image_server.add(images.jpeg())])])
    request_pk, (image_id,) = make_batch(
        engine, [(1, "A", [image_server.add(images.jpeg())])], "https://h.example/x"
    )
    first = process_image(services.ledger, services.stages, image_id)
    second = process_image(services.ledger, services.stages, image_id)
    assert len(first) == 1 and second == []
    request = request_row(engine, request_pk)
    assert (request.succeeded_images, request.failed_images, request.status) == (1, 0, "completed")
    other = request_row(engine, other_pk)  # finishing one request finishes no other
    assert (other.status, other.completed_at, event_count(engine, other_pk)) == ("pending", None, 0)
    # Counted once in the metrics, as in the request.
    counted = services.metrics.registry.get_sample_value
    assert counted("image_service_images_total", {"outcome": "succeeded", "code": ""}) == 1
    with writer_sessionmaker(engine)() as session:  # the webhook's link is the service's own
        (payload,) = session.scalars(
            select(WebhookEvent.payload).where(WebhookEvent.request_pk == request_pk)
        )
        request_id = session.get(ProcessingRequest, request_pk).request_id
    assert json.loads(payload)["download_url"] == f"http://testserver/download/{request_id}"
    assert len(list(media_root.glob("*/*.jpg"))) == 1  # outputs; thumbnails are in */thumbs/


def test_recording_the_same_outcome_twice_counts_once(engine, services, image_server):
    request_pk, ids = make_batch(
        engine, [(1, "A", [image_server.add(images.jpeg()), image_server.add(images.jpeg())])]
    )
    units = services.ledger.claim_images(ids)
    outcome = services.stages.run(units[0])
    services.ledger.record_outcomes([outcome])
    services.ledger.record_outcomes([outcome])
    request = request_row(engine, request_pk)
    assert (request.succeeded_images, request.status) == (1, "processing")


def test_a_late_result_from_a_lost_lease_is_ignored(engine, services, image_server, settings):
    request_pk, (image_id,) = make_batch(engine, [(1, "A", [image_server.add(images.jpeg())])])
    (stale,) = services.ledger.claim_images([image_id])
    assert services.ledger.claim_images([image_id]) == []  # lease still held
    with writer_sessionmaker(engine).begin() as session:  # the lease runs out
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
        )
    (fresh,) = services.ledger.claim_images([image_id])
    assert fresh.attempt == stale.attempt + 1
    services.ledger.record_outcomes([services.stages.run(stale)])
    assert request_row(engine, request_pk).succeeded_images == 0
    services.ledger.record_outcomes([services.stages.run(fresh)])
    request = request_row(engine, request_pk)
    assert (request.succeeded_images, request.status) == (1, "completed")


def test_concurrent_last_images_finish_the_request_exactly_once(engine, services, image_server):
    url = image_server.add(images.jpeg((16, 16)))
    request_pk, ids = make_batch(engine, [(n, f"P{n}", [url]) for n in range(1, 41)], "https://h.example/x")
    outcomes = [services.stages.run(unit) for unit in services.ledger.claim_images(ids)]
    events: list[int] = []
    barrier = threading.Barrier(8)

    def record(chunk):
        barrier.wait()
        for outcome in chunk:
            events.extend(services.ledger.record_outcomes([outcome]))

    threads = [threading.Thread(target=record, args=(outcomes[n::8],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    request = request_row(engine, request_pk)
    assert (request.succeeded_images, request.status) == (40, "completed")
    assert request.completed_at is not None
    with writer_sessionmaker(engine)() as session:  # the one its caller dispatches
        assert events == list(
            session.scalars(select(WebhookEvent.id).where(WebhookEvent.request_pk == request_pk))
        )


def test_released_units_go_back_to_pending(engine, services, image_server):
    _, (image_id,) = make_batch(engine, [(1, "A", [image_server.add(images.jpeg())])])
    units = services.ledger.claim_images([image_id])
    services.ledger.release(units)
    assert [unit.image_id for unit in services.ledger.claim_images([image_id])] == [image_id]


def test_renewed_leases_are_not_taken_back(engine, services, image_server, settings):
    _, (image_id,) = make_batch(engine, [(1, "A", [image_server.add(images.jpeg())])])
    units = services.ledger.claim_images([image_id])
    with writer_sessionmaker(engine).begin() as session:
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
        )
    services.ledger.renew_leases(units)
    assert services.ledger.claim_images([image_id]) == []


def test_the_claims_of_a_process_that_stopped_renewing_are_taken_back_and_no_others(
    engine, services, image_server, settings
):
    """What the runner's recovery asks the ledger, called directly: whether some image is
    claimable, then the images whose lease ran out, claimed again (up to the limit)."""
    urls = [image_server.add(images.jpeg()) for _ in range(3)]
    _, ids = make_batch(engine, [(n, f"P{n}", [url]) for n, url in enumerate(urls, start=1)])
    units = services.ledger.claim_images(ids)
    assert services.ledger.with_revalidation([]) == []  # an empty claim reads nothing
    assert services.ledger.has_claimable_work() is False
    assert services.ledger.claim_next(8, expired_too=True).units == []
    with writer_sessionmaker(engine).begin() as session:  # two processes stopped renewing
        session.execute(
            update(Image)
            .where(Image.id.in_(ids[:2]))
            .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
        )
    assert services.ledger.has_claimable_work() is True
    assert services.ledger.claim_next(8).units == []  # not without expired_too
    first = services.ledger.claim_next(1, expired_too=True).units
    assert [(u.image_id, u.attempt) for u in first] == [(ids[0], units[0].attempt + 1)]
    second = services.ledger.claim_next(8, expired_too=True).units
    assert [(u.image_id, u.attempt) for u in second] == [(ids[1], units[1].attempt + 1)]
    assert services.ledger.has_claimable_work() is False


def test_a_cancel_in_batches_cancels_each_batch_in_id_order_and_finishes_with_the_last(
    engine, services, image_server
):
    url = image_server.add(images.jpeg())
    request_pk, ids = make_batch(engine, [(n, f"P{n}", [url]) for n in range(1, 6)])

    def statuses():
        with writer_sessionmaker(engine)() as session:
            return list(session.scalars(select(Image.status).where(Image.id.in_(ids)).order_by(Image.id)))

    batches, after = [], 0
    while True:
        cancellation = services.ledger.cancel(request_pk, limit=2, after_image_id=after)
        batches.append((cancellation.cancelled_images, cancellation.status, statuses().count("cancelled")))
        if not cancellation.cancelled_images:
            break
        assert cancellation.last_image_id == ids[min(2 * len(batches), 5) - 1]
        after = cancellation.last_image_id
    assert batches == [(2, "cancelling", 2), (2, "cancelling", 4), (1, "cancelled", 5), (0, "cancelled", 5)]
    request = request_row(engine, request_pk)
    assert (request.cancelled_images, request.succeeded_images, request.failed_images) == (5, 0, 0)
    assert request.reused_images == 0


@pytest.mark.skipif(not on_postgres(), reason="row locks: PostgreSQL (TEST_DATABASE_URL)")
def test_a_cancel_batch_skips_the_images_a_claim_is_taking_instead_of_waiting_for_them(
    engine, services, image_server
):
    """On PostgreSQL a batch of a cancel never waits for a claim's locks (SKIP LOCKED): it
    cancels the other images while the claim's transaction is open, and the claim gets
    its image."""
    url = image_server.add(images.jpeg())
    request_pk, ids = make_batch(engine, [(n, f"P{n}", [url]) for n in range(1, 5)])
    done: list[Cancellation] = []
    with engine.connect() as claim, claim.begin():
        claim.execute(
            update(Image)
            .where(Image.id == ids[0])
            .values(status="processing", claimed_at=utcnow(), attempts=Image.attempts + 1)
        )
        batch = threading.Thread(target=lambda: done.append(services.ledger.cancel(request_pk, limit=4)))
        batch.start()
        deadline = time.monotonic() + 30
        while batch.is_alive():
            assert not claim.scalar(
                text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")
            ), "the cancel batch waited for the claim's lock"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    batch.join(30)
    ((cancelled, last_image_id),) = [(c.cancelled_images, c.last_image_id) for c in done]
    assert (cancelled, last_image_id) == (3, ids[3])
    with writer_sessionmaker(engine)() as session:
        statuses = list(session.scalars(select(Image.status).where(Image.id.in_(ids)).order_by(Image.id)))
    assert statuses == ["processing", "cancelled", "cancelled", "cancelled"]


@pytest.fixture
def storage(settings) -> FillableStorage:
    return FillableStorage(settings.media_root)


@pytest.fixture
def retrying_services(make_settings, storage):
    """The app's services, with a storage the test can fill, and backoffs far longer than
    any test step: 10 s, doubling, capped at 25 s."""
    settings = make_settings(transient_retry_base_seconds=10, transient_retry_max_seconds=25)
    stages = ImageStages.from_config(stage_config(settings), storage=storage)
    services = build_parts(settings, runs_images=True, stages=stages)
    yield services
    services.close()


def image_row(engine, image_id) -> Image:
    with writer_sessionmaker(engine)() as session:
        return session.get(Image, image_id)


def make_due(engine, image_id) -> None:
    with writer_sessionmaker(engine).begin() as session:
        session.execute(
            update(Image).where(Image.id == image_id).values(retry_at=utcnow() - timedelta(seconds=1))
        )


def test_a_full_disk_puts_the_image_back_to_wait_with_growing_backoff(
    engine, retrying_services, storage, image_server, caplog
):
    caplog.set_level(logging.INFO, logger="app.ledger.image_ledger")
    services = retrying_services
    request_pk, (image_id, other_id) = make_batch(
        engine, [(1, "A", [image_server.add(images.jpeg()), image_server.add(images.jpeg())])]
    )
    storage.full.set()
    for backoff_seconds in (10, 20, 25):  # doubling from the base, up to the cap
        (unit,) = services.ledger.claim_images([image_id])
        outcome = services.stages.run(unit)
        assert outcome.retry_later and outcome.error_code == "storage_error"
        before = utcnow()
        assert services.ledger.record_outcomes([outcome]) == []
        after = utcnow()
        image = image_row(engine, image_id)
        assert (image.status, image.error_code) == ("pending", "storage_error")
        assert "No space left on device" in image.error_message
        # No claim held while it waits, and not waiting for its origin (the storage failed).
        assert (image.claimed_at, image.waiting_since) == (None, None)
        backoff = timedelta(seconds=backoff_seconds)
        assert before + backoff <= image.retry_at <= after + backoff
        request = request_row(engine, request_pk)
        assert (request.succeeded_images, request.failed_images, request.status) == (0, 0, "processing")
        # Waiting: neither claimable nor offered, and the feeder knows when it will be.
        assert services.ledger.claim_images([image_id]) == []
        with writer_sessionmaker(engine)() as session:
            assert next_claimable_ids(session, 8)[0] == [other_id]
            assert 0 < seconds_until_next_retry(session) <= backoff_seconds
        make_due(engine, image_id)
    assert image_row(engine, image_id).transient_failures == 3
    assert storage.refused == 3
    # The operator's log has a line for each wait.
    waits = [r.getMessage() for r in caplog.records if r.name == "app.ledger.image_ledger"]
    assert len(waits) == 3 and all(f"image {image_id} waits for a retry: storage_error: " in w for w in waits)

    storage.full.clear()
    (unit,) = services.ledger.claim_images([image_id])
    services.ledger.record_outcomes([services.stages.run(unit)])
    image = image_row(engine, image_id)
    assert (image.status, image.error_code, image.error_message) == ("succeeded", None, None)
    (unit,) = services.ledger.claim_images([other_id])
    services.ledger.record_outcomes([services.stages.run(unit)])
    request = request_row(engine, request_pk)
    assert (request.succeeded_images, request.failed_images, request.status) == (2, 0, "completed")


def test_a_storage_failure_waits_its_own_backoff_even_when_its_host_has_just_asked_for_less(
    engine, retrying_services, storage, image_server
):
    """The host answered this image; only the storage failed. Its host's backoff (asked
    for by another image's 429 in the same round) is no reason to come back sooner."""
    services = retrying_services
    _, (stored_id, refused_id) = make_batch(
        engine,
        [
            (1, "A", [image_server.add(images.jpeg())]),
            (2, "B", [image_server.add(b"slow down", "text/plain", 429, headers={"Retry-After": "1"})]),
        ],
    )
    storage.full.set()
    units = services.ledger.claim_images([stored_id, refused_id])
    outcomes = [services.stages.run(unit) for unit in units]
    assert [(o.error_code, o.retry_later, o.origin_failure) for o in outcomes] == [
        ("storage_error", True, False),
        ("http_429", True, True),
    ]
    before = utcnow()
    services.ledger.record_outcomes(outcomes)
    after = utcnow()
    stored, refused = image_row(engine, stored_id), image_row(engine, refused_id)
    assert stored.status == refused.status == "pending"
    # The origin's image waits for the second its host asked for; the other the storage's 10 s.
    assert before + timedelta(seconds=1) <= refused.retry_at <= after + timedelta(seconds=1)
    assert before + timedelta(seconds=10) <= stored.retry_at <= after + timedelta(seconds=10)


def test_a_transient_failure_puts_back_only_the_image_and_claim_it_names(
    engine, retrying_services, storage, image_server, settings
):
    services = retrying_services
    _, (image_id, other_id) = make_batch(
        engine, [(1, "A", [image_server.add(images.jpeg()), image_server.add(images.jpeg())])]
    )
    storage.full.set()
    unit, other = services.ledger.claim_images([image_id, other_id])
    assert unit.attempt == other.attempt
    services.ledger.record_outcomes([services.stages.run(unit)])
    assert image_row(engine, image_id).status == "pending"
    # The other image, claimed with the same attempt number, keeps its claim.
    assert image_row(engine, other_id).status == "processing"

    # An old claim's late outcome changes nothing once the image is claimed again.
    make_due(engine, image_id)
    (stale,) = services.ledger.claim_images([image_id])
    stale_outcome = services.stages.run(stale)
    with writer_sessionmaker(engine).begin() as session:  # its lease runs out
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
        )
    (fresh,) = services.ledger.claim_images([image_id])
    services.ledger.record_outcomes([stale_outcome])
    image = image_row(engine, image_id)
    assert (image.status, image.attempts) == ("processing", fresh.attempt)


def test_requests_whose_images_all_wait_for_a_retry_hold_up_nobody(engine, services, image_server):
    url = image_server.add(images.jpeg())
    waiting = [make_batch(engine, [(1, "W", [url])])[1][0] for _ in range(3)]
    _, (ready_id,) = make_batch(engine, [(1, "R", [url])])
    with writer_sessionmaker(engine)() as session:
        assert seconds_until_next_retry(session) is None  # nothing waits yet
    assert services.ledger.seconds_until_next_retry() is None
    with writer_sessionmaker(engine).begin() as session:
        session.execute(
            update(Image)
            .where(Image.id.in_(waiting))
            .values(retry_at=utcnow() + timedelta(seconds=60), transient_failures=1)
        )
    with writer_sessionmaker(engine)() as session:
        # Turns of two requests: the first turn (two waiting requests) has nothing to give.
        ids, last_served = next_claimable_ids(session, 2)
        assert ids == [ready_id]
        assert 59 < seconds_until_next_retry(session) <= 60
    assert [unit.image_id for unit in services.ledger.claim_images([ready_id])] == [ready_id]
    with writer_sessionmaker(engine)() as session:
        # All the way round with no work at all: an empty answer, not an endless walk.
        assert next_claimable_ids(session, 2, last_served)[0] == []
    with writer_sessionmaker(engine).begin() as session:
        session.execute(update(Image).where(Image.id == waiting[1]).values(retry_at=utcnow()))
    with writer_sessionmaker(engine)() as session:  # its wait is over
        assert next_claimable_ids(session, 2)[0] == [waiting[1]]


def test_a_turn_gives_each_request_its_share_and_turns_rotate(engine, services, image_server):
    """Six requests of five images, claims of four: a turn serves four requests one image
    each (not four images of the oldest), and the next turn starts after the last served."""
    url = image_server.add(images.jpeg())
    batches = [
        make_batch(engine, [(n, f"P{n}", [f"{url}?{r}-{n}"]) for n in range(1, 6)])[1] for r in range(6)
    ]
    claimed_per_turn = []
    last_served = 0
    for _ in range(3):
        claim = services.ledger.claim_next(4, last_served)
        last_served = claim.last_request_served
        claimed_per_turn.append(sorted(unit.image_id for unit in claim.units))
    assert claimed_per_turn == [
        sorted(batches[0][:1] + batches[1][:1] + batches[2][:1] + batches[3][:1]),
        sorted(batches[4][:1] + batches[5][:1] + batches[0][1:2] + batches[1][1:2]),
        sorted(batches[2][1:2] + batches[3][1:2] + batches[4][1:2] + batches[5][1:2]),
    ]
    # Fewer requests than the claim: the claim is shared between them, oldest images first.
    with writer_sessionmaker(engine)() as session:
        ids, _ = next_claimable_ids(session, 10, 0)  # a share of 10 / 6, rounded up
        # Read without claiming, the turns go on from where the claims left them.
        turn, served = next_claimable_ids(session, 4, last_served)
        next_turn, _ = next_claimable_ids(session, 4, served)
    assert ids == sorted(image_id for batch in batches for image_id in batch[2:4])
    assert turn == sorted(batch[2] for batch in batches[:4])
    assert next_turn == sorted([batches[4][2], batches[5][2], batches[0][2], batches[1][2]])


def test_hand_backs_and_expired_leases_charge_no_crash(engine, services, image_server, settings):
    url = image_server.add(images.jpeg())
    request_pk, (image_id,) = make_batch(engine, [(1, "A", [url])])
    for _ in range(MAX_WORKER_CRASHES):
        services.ledger.release(services.ledger.claim_images([image_id]))
        released = image_row(engine, image_id)
        assert (released.status, released.claimed_at) == ("pending", None)
        services.ledger.claim_images([image_id])
        with writer_sessionmaker(engine).begin() as session:  # the lease runs out
            session.execute(
                update(Image)
                .where(Image.id == image_id)
                .values(claimed_at=utcnow() - timedelta(seconds=settings.lease_seconds + 1))
            )
    for _ in range(MAX_WORKER_CRASHES - 1):
        (unit,) = services.ledger.claim_images([image_id])
        services.ledger.charge_crashes([(unit.image_id, unit.attempt)])
    process_image(services.ledger, services.stages, image_id)
    image = image_row(engine, image_id)
    assert (image.status, image.crash_count) == ("succeeded", MAX_WORKER_CRASHES - 1)
    assert request_row(engine, request_pk).status == "completed"


def test_an_image_charged_the_most_crashes_fails_without_being_fetched(engine, services, image_server):
    url = image_server.add(images.jpeg())
    request_pk, (image_id,) = make_batch(engine, [(1, "A", [url])], "https://h.example/x")
    stale = None
    for _ in range(MAX_WORKER_CRASHES):
        (unit,) = services.ledger.claim_images([image_id])
        services.ledger.charge_crashes([(unit.image_id, unit.attempt)])
        stale = unit
        charged = image_row(engine, image_id)  # back to pending, holding no claim
        assert (charged.status, charged.claimed_at) == ("pending", None)
    services.ledger.charge_crashes([(stale.image_id, stale.attempt)])  # an old claim changes nothing
    events = process_image(services.ledger, services.stages, image_id)
    image = image_row(engine, image_id)
    assert (image.status, image.error_code, image.crash_count) == (
        "failed",
        "worker_crashed",
        MAX_WORKER_CRASHES,
    )
    assert request_row(engine, request_pk).status == "failed" and len(events) == 1
    assert image_server.hits_for(url) == 0


def test_a_cancel_ends_its_own_requests_pending_images_and_no_one_elses(engine, services, image_server):
    url = image_server.add(images.jpeg((16, 16)))
    request_pk, ids = make_batch(engine, [(1, "A", [f"{url}?{n}" for n in range(4)])], "https://h.example/x")
    other_pk, other_ids = make_batch(engine, [(1, "B", [f"{url}?b{n}" for n in range(2)])])
    (in_flight,) = services.ledger.claim_images(ids[:1])
    with writer_sessionmaker(engine).begin() as session:  # one image waits for a retry
        session.execute(
            update(Image).where(Image.id == ids[1]).values(retry_at=utcnow() + timedelta(hours=1))
        )
    before = utcnow()

    cancellation = services.ledger.cancel(request_pk)
    assert cancellation == Cancellation("cancelling", 3, None, finished_before=False)
    for image_id in ids[1:]:
        image = image_row(engine, image_id)
        assert (image.status, image.retry_at) == ("cancelled", None)
        assert image.finished_at is not None and image.finished_at >= before
    assert image_row(engine, ids[0]).status == "processing"
    cancelled_at = request_row(engine, request_pk).cancelled_at
    assert cancelled_at is not None and cancelled_at >= before
    # Another request is untouched.
    assert [image_row(engine, image_id).status for image_id in other_ids] == ["pending", "pending"]
    assert request_row(engine, other_pk).cancelled_at is None

    # Again while the image in flight runs: nothing more, and the first cancel's time stays.
    assert services.ledger.cancel(request_pk) == Cancellation("cancelling", 0, None, finished_before=False)
    assert request_row(engine, request_pk).cancelled_at == cancelled_at

    # The image in flight finishes: the request ends cancelled, with its one event.
    events = services.ledger.record_outcomes([services.stages.run(in_flight)])
    request = request_row(engine, request_pk)
    assert (request.status, request.succeeded_images, request.cancelled_images) == ("cancelled", 1, 3)
    assert request.completed_at is not None and len(events) == 1
    assert services.ledger.cancel(request_pk) == Cancellation("cancelled", 0, None, finished_before=False)

    # A request that finished otherwise: a cancel changes nothing and says so.
    for image_id in other_ids:
        process_image(services.ledger, services.stages, image_id)
    assert services.ledger.cancel(other_pk) == Cancellation("completed", 0, None, finished_before=True)
    assert request_row(engine, other_pk).cancelled_at is None


def test_a_cancel_with_nothing_in_flight_finishes_the_request_and_creates_its_event(
    engine, services, image_server
):
    url = image_server.add(images.jpeg((16, 16)))
    request_pk, _ = make_batch(engine, [(1, "A", [f"{url}?{n}" for n in range(2)])], "https://h.example/x")
    before = utcnow()
    cancellation = services.ledger.cancel(request_pk)
    assert (cancellation.status, cancellation.cancelled_images, cancellation.finished_before) == (
        "cancelled",
        2,
        False,
    )
    with writer_sessionmaker(engine)() as session:
        (event_id,) = session.scalars(select(WebhookEvent.id).where(WebhookEvent.request_pk == request_pk))
    assert cancellation.event_id == event_id
    request = request_row(engine, request_pk)
    assert request.completed_at is not None and request.completed_at >= before


def test_a_retry_puts_back_the_failed_images_of_its_own_request_with_a_fresh_start(
    engine, services, image_server
):
    missing = [image_server.add(b"gone", "text/plain", status=404, suffix=".jpg") for _ in range(2)]
    request_pk, (*ids, copy_id) = make_batch(engine, [(1, "A", missing), (2, "A copy", missing[:1])])
    _, other_ids = make_batch(engine, [(1, "B", missing[:1])])
    for image_id in ids + other_ids:
        process_image(services.ledger, services.stages, image_id)
    assert (image_row(engine, copy_id).status, image_row(engine, copy_id).error_code) == (
        "failed",
        "http_404",
    )
    assert request_row(engine, request_pk).status == "failed"
    with writer_sessionmaker(engine).begin() as session:  # what earlier rounds left
        session.execute(update(Image).where(Image.id.in_(ids)).values(transient_failures=2, crash_count=1))

    with writer_sessionmaker(engine).begin() as session:
        assert services.ledger.retry_failed(session, request_pk, ["http_500"]) == FailedImagesRetry(
            "failed", 0
        )
    with writer_sessionmaker(engine).begin() as session:
        assert services.ledger.retry_failed(session, request_pk) == FailedImagesRetry("failed", 3)
    copy = image_row(engine, copy_id)  # a copy again, waiting for its source's new result
    assert (copy.status, copy.error_code, copy.error_message, copy.finished_at) == ("copy", None, None, None)
    for image_id in ids:
        image = image_row(engine, image_id)
        assert (image.status, image.transient_failures, image.crash_count) == ("pending", 0, 0)
        assert (image.error_code, image.error_message, image.finished_at) == (None, None, None)
    request = request_row(engine, request_pk)
    assert (request.status, request.failed_images, request.completed_at) == ("processing", 0, None)
    # Another request's failed image stays as it was.
    assert image_row(engine, other_ids[0]).status == "failed"
    # A request that is running is not retried.
    with writer_sessionmaker(engine).begin() as session:
        assert services.ledger.retry_failed(session, request_pk) == FailedImagesRetry("processing", 0)


def test_release_renew_and_charge_change_only_the_claims_they_name(engine, services, image_server):
    url = image_server.add(images.jpeg())
    _, (a, b) = make_batch(engine, [(1, "A", [f"{url}?a", f"{url}?b"])])
    stale, unit_b = services.ledger.claim_images([a, b])
    assert stale.attempt == unit_b.attempt
    services.ledger.release([stale])
    assert (image_row(engine, a).status, image_row(engine, b).status) == ("pending", "processing")

    (fresh,) = services.ledger.claim_images([a])
    services.ledger.release([stale])  # an old claim of the image: changes nothing
    services.ledger.charge_crashes([(stale.image_id, stale.attempt)])
    image = image_row(engine, a)
    assert (image.status, image.attempts, image.crash_count) == ("processing", fresh.attempt, 0)

    long_ago = utcnow() - timedelta(hours=1)
    with writer_sessionmaker(engine).begin() as session:
        session.execute(update(Image).where(Image.id.in_([a, b])).values(claimed_at=long_ago))
    services.ledger.renew_leases([stale, unit_b])
    assert image_row(engine, a).claimed_at == long_ago  # the old claim renews nothing
    assert image_row(engine, b).claimed_at > long_ago


def test_an_outputs_encoding_key_is_its_batchs_options_or_the_default_and_the_output_policy():
    """Outputs are reused only under the same key: other options, or the same options under
    another output policy (metadata, colours, the pipeline's version), encode again."""
    default, chosen = OutputOptions(quality=80), OutputOptions(quality=60, format="webp")
    keys = EncodingKeys(default, policy="policy-1")
    assert keys.of(None) == keys.of(default) != keys.of(chosen)
    assert EncodingKeys(default, policy="policy-2").of(chosen) != keys.of(chosen)
    assert EncodingKeys().of(None) is None
    assert EncodingKeys().of(chosen) != EncodingKeys().of(default)
