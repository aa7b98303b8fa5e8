"""Per-host politeness on real origins (tests/servers.py Origin, each a host:port of its
own): at most FETCH_PER_HOST_CONCURRENCY images of a host in flight, 429/503 and other
passing trouble put the host in backoff and the image back to wait, a host failing round
after round gets one image at a time, and an image waits at most
FETCH_RETRY_WINDOW_SECONDS. The claim is checked on the ledger itself, then the whole
service on both runners."""

import io
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update

from app.composition import build_parts
from app.db.base import utcnow
from app.db.models import Host, Image, ProcessingRequest
from app.db.session import writer_sessionmaker
from app.main import create_app
from app.net.urls import UrlHosts, url_host
from app.services.batches import create_batch
from app.services.csv_checks import CsvLimits
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.deployment import NEEDS_POSTGRES
from tests.support.deployment import test_database_is_postgres as on_postgres
from tests.support.servers import Origin

LIMITS = CsvLimits(1_000_000, 1 << 20, 1000, 50)
JPEG = images.jpeg()


@pytest.fixture
def origins() -> Iterator[list[Origin]]:
    """origins.append(Origin(...)) starts one; all are stopped after the test."""
    started: list[Origin] = []
    yield started
    for origin in started:
        origin.__exit__()


def start_origin(origins: list[Origin], **options) -> Origin:
    origin = Origin(JPEG, **options).__enter__()
    origins.append(origin)
    return origin


def allowing(make_settings, origins: list[Origin], **overrides):
    hosts = ",".join(f"127.0.0.1:{origin.port}" for origin in origins)
    return make_settings(allow_private_hosts=hosts, **overrides)


def make_batch(engine, urls: list[str]) -> tuple[int, list[int]]:
    with writer_sessionmaker(engine).begin() as session:
        rows = [(n, f"P{n}", [url]) for n, url in enumerate(urls, start=1)]
        request = create_batch(session, io.BytesIO(csv_of(rows)), LIMITS, webhook_url=None, owner=None)
        ids = session.scalars(select(Image.id).where(Image.request_pk == request.id).order_by(Image.id))
        return request.id, list(ids)


def image_row(engine, image_id: int) -> Image:
    with writer_sessionmaker(engine)() as session:
        return session.get(Image, image_id)


def host_row(engine, name: str) -> Host:
    with writer_sessionmaker(engine)() as session:
        return session.get(Host, name)


def make_host_due(engine, name: str) -> None:
    """The host's backoff and its images' waits run out now (time passes, as in the tests
    of transient store failures)."""
    past = utcnow() - timedelta(seconds=1)
    with writer_sessionmaker(engine).begin() as session:
        session.execute(update(Host).where(Host.name == name).values(backoff_until=past))
        session.execute(
            update(Image).where(Image.host == name, Image.retry_at.is_not(None)).values(retry_at=past)
        )


@pytest.fixture
def parts_of(make_settings, origins):
    built = []

    def build(**overrides):
        parts = build_parts(allowing(make_settings, origins, **overrides), runs_images=True)
        built.append(parts)
        return parts

    yield build
    for parts in built:
        parts.close()


def test_the_host_is_the_urls_authority_lower_cased_with_a_port_other_than_the_default():
    assert url_host("https://user@CDN.Example.com/a.jpg?x=1") == "cdn.example.com"
    assert url_host("http://cdn.example.com:80/a.jpg") == "cdn.example.com"
    assert url_host("https://cdn.example.com:443#top") == "cdn.example.com"
    assert url_host("http://127.0.0.1:8080?x") == "127.0.0.1:8080"
    assert url_host("https://[::1]:80/x") == "[::1]:80"
    assert url_host("http://XYZ.example/a/b/c/d.jpg") == "xyz.example"
    assert url_host("HTTPS://h.example:443/a") == "h.example"
    assert url_host("https://h.example:80/a") == "h.example:80"
    assert url_host("http://h.example:443") == "h.example:443"
    assert url_host("http://h.example?a=1?b=2#c#d") == "h.example"


def test_hosts_remembered_over_an_upload_are_each_urls_own_host():
    urls = [
        "https://CDN.example.com/a.jpg",
        "https://cdn.example.com/b.jpg",
        "http://cdn.example.com/a.jpg",
        "http://cdn.example.com:80/a.jpg",
        "http://cdn.example.com:8080/a.jpg",
        "https://user@cdn.example.com/a.jpg",
        "http://a.example.com?x=1/y",
        "http://a.example.com?x=2/y",
        "http://b.example.com#z/y",
        "https://c.example.com",
        "https://c.example.com:443",
        "https://[::1]:80/x",
        "https://cdn.example.com/b.jpg",
        "http://h.example:8080",
        "http://h.example:8081",
    ] + [f"https://h{n}.example.com/{n}.jpg" for n in range(UrlHosts.MAX_REMEMBERED + 10)]
    host_of = UrlHosts()
    assert [host_of(url) for url in urls + urls] == [url_host(url) for url in urls + urls]


def test_uploads_store_each_images_host_and_a_row_per_host(parts_of, origins):
    first, second = start_origin(origins), start_origin(origins)
    parts = parts_of()
    request_pk, ids = make_batch(parts.engine, first.urls(2) + second.urls(1))
    assert [image_row(parts.engine, image_id).host for image_id in ids] == [
        f"127.0.0.1:{first.port}",
        f"127.0.0.1:{first.port}",
        f"127.0.0.1:{second.port}",
    ]
    assert host_row(parts.engine, f"127.0.0.1:{second.port}") is not None
    with writer_sessionmaker(parts.engine)() as session:
        assert session.get(ProcessingRequest, request_pk).host_count == 2


def test_a_claim_keeps_a_host_to_its_limit_while_other_hosts_flow(parts_of, origins):
    busy, other = start_origin(origins), start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=3)
    ledger = parts.ledger
    make_batch(parts.engine, busy.urls(10))
    make_batch(parts.engine, other.urls(2))

    claim = ledger.claim_next(16)
    hosts = [unit.host for unit in claim.units]
    assert hosts.count(f"127.0.0.1:{busy.port}") == 3
    assert hosts.count(f"127.0.0.1:{other.port}") == 2
    assert claim.passed_over_hosts
    assert ledger.claim_next(16).units == []  # both hosts: at the limit, or nothing left

    finished = next(unit for unit in claim.units if unit.host == f"127.0.0.1:{busy.port}")
    ledger.record_outcomes([parts.stages.run(finished)])
    again = ledger.claim_next(16).units
    assert [unit.host for unit in again] == [f"127.0.0.1:{busy.port}"]


@pytest.mark.skipif(not on_postgres(), reason="row locks: PostgreSQL (TEST_DATABASE_URL)")
def test_a_claim_waits_for_another_claims_lock_on_its_host_then_counts_what_that_one_took(parts_of, origins):
    """Two claims at once on PostgreSQL: the second waits for the first's lock on the
    host's row (taken between its reading of the room and its commit), then counts the
    images the first put in flight, and keeps the host to its limit."""
    origin = start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=2)
    _, image_ids = make_batch(parts.engine, origin.urls(6))
    name = f"127.0.0.1:{origin.port}"
    claimed: list = []
    with parts.engine.connect() as first, first.begin():
        first.execute(select(Host.name).where(Host.name == name).with_for_update())
        second = threading.Thread(target=lambda: claimed.extend(parts.ledger.claim_next(16).units))
        second.start()
        deadline = time.monotonic() + 30
        while not first.scalar(
            text("SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'")
        ):
            assert second.is_alive(), "the second claim did not wait for the lock on its host"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.execute(
            update(Image)
            .where(Image.id.in_(image_ids[:2]))
            .values(status="processing", claimed_at=utcnow(), attempts=Image.attempts + 1)
        )
    second.join(30)
    assert claimed == []  # the host's two places were taken by the first claim


def test_requests_take_turns_even_when_their_host_has_room_for_one(parts_of, origins):
    origin = start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=1)
    first, _ = make_batch(parts.engine, origin.urls(5))
    second, _ = make_batch(parts.engine, origin.urls(5))
    served, order = 0, []
    for _ in range(4):
        claim = parts.ledger.claim_next(8, served)
        (unit,) = claim.units
        served = claim.last_request_served
        order.append(unit.request_pk)
        parts.ledger.record_outcomes([parts.stages.run(unit)])
    assert order == [first, second, first, second]


def test_the_next_turn_starts_after_a_request_that_had_nothing_to_give_when_no_host_was_full(
    parts_of, origins
):
    """A turn of two requests: the first gives its image, the second has only images waiting
    for a retry. No host ran out of room, so the whole turn was served and the next starts
    after the second; only a turn cut short by a full host ends at the last request given."""
    origin = start_origin(origins)
    parts = parts_of()
    giving, _ = make_batch(parts.engine, origin.urls(1))
    waiting, waiting_ids = make_batch(parts.engine, origin.urls(2))
    _, later_ids = make_batch(parts.engine, origin.urls(1))
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Image).where(Image.id.in_(waiting_ids)).values(retry_at=utcnow() + timedelta(minutes=5))
        )
    claim = parts.ledger.claim_next(2)
    assert [unit.request_pk for unit in claim.units] == [giving]
    assert (claim.last_request_served, claim.passed_over_hosts) == (waiting, False)
    assert [
        unit.image_id for unit in parts.ledger.claim_next(2, claim.last_request_served).units
    ] == later_ids


def test_a_request_naming_several_hosts_looks_past_a_host_at_its_limit(parts_of, origins):
    busy, other = start_origin(origins), start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=2)
    make_batch(parts.engine, busy.urls(20) + other.urls(3))
    units = parts.ledger.claim_next(4).units
    assert sorted(unit.host for unit in units) == sorted(
        [f"127.0.0.1:{busy.port}"] * 2 + [f"127.0.0.1:{other.port}"] * 2
    )


def test_a_look_ahead_takes_each_image_once_and_no_more_than_the_share(parts_of, origins):
    """A request naming three hosts, room for 2 each, a claim of 4: its first 4 images are
    three of the full host and one of the next; reading on past them takes the next host's
    second image and stops at 4, taking again none it took already."""
    full, following, last = (start_origin(origins) for _ in range(3))
    parts = parts_of(fetch_per_host_concurrency=2)
    _, ids = make_batch(parts.engine, full.urls(3) + following.urls(3) + last.urls(2))
    claim = parts.ledger.claim_next(4)
    assert [unit.image_id for unit in claim.units] == [ids[0], ids[1], ids[3], ids[4]]
    assert claim.passed_over_hosts


def test_after_a_turn_held_up_by_a_full_host_the_next_turn_is_served_to_its_end(parts_of, origins):
    """Two requests wait for a full host (passed over, nothing given), so the claim reads
    the next turn: its first request gives an image, its second has only an image waiting
    for a retry. Nothing was passed over in that turn, so it ends at its last request."""
    full, other = start_origin(origins), start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=1)
    first, _ = make_batch(parts.engine, full.urls(1))
    assert len(parts.ledger.claim_next(1).units) == 1  # the full host's one image in flight
    for _ in range(2):
        make_batch(parts.engine, full.urls(1))
    _, giving_ids = make_batch(parts.engine, other.urls(1))
    waiting, waiting_ids = make_batch(parts.engine, other.urls(1))
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Image).where(Image.id.in_(waiting_ids)).values(retry_at=utcnow() + timedelta(minutes=5))
        )
    claim = parts.ledger.claim_next(2, first)
    assert [unit.image_id for unit in claim.units] == giving_ids
    assert (claim.last_request_served, claim.passed_over_hosts) == (waiting, True)


def test_the_next_retry_is_the_earliest_of_an_images_wait_and_a_hosts_backoff(parts_of, origins):
    """What the feeder sleeps for when nothing is claimable: an image's own wait, or its
    host's backoff when no image waits (nothing else would wake it)."""
    backing_off, waiting = start_origin(origins), start_origin(origins)
    parts = parts_of()
    make_batch(parts.engine, backing_off.urls(1))
    _, (waiting_id,) = make_batch(parts.engine, waiting.urls(1))
    assert parts.ledger.seconds_until_next_retry() is None
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Image).where(Image.id == waiting_id).values(retry_at=utcnow() + timedelta(seconds=60))
        )
    assert 59 < parts.ledger.seconds_until_next_retry() <= 60
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Host)
            .where(Host.name == url_host(backing_off.urls(1)[0]))
            .values(backoff_until=utcnow() + timedelta(seconds=30), consecutive_failures=1)
        )
    assert 29 < parts.ledger.seconds_until_next_retry() <= 30
    assert parts.ledger.has_claimable_work() is False  # the host backs off, the image waits


def test_a_retry_or_a_backoff_under_a_second_away_is_waited_for_as_it_is(parts_of, origins, monkeypatch):
    """The feeder sleeps until the next retry, however short, not a whole second: the
    clock is held still so the wait is exact."""
    backing_off, waiting = start_origin(origins), start_origin(origins)
    parts = parts_of()
    make_batch(parts.engine, backing_off.urls(1))
    _, (waiting_id,) = make_batch(parts.engine, waiting.urls(1))
    now = utcnow()
    monkeypatch.setattr("app.ledger.turns.utcnow", lambda: now)
    monkeypatch.setattr("app.ledger.image_ledger.utcnow", lambda: now)
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Image).where(Image.id == waiting_id).values(retry_at=now + timedelta(seconds=0.5))
        )
    assert parts.ledger.seconds_until_next_retry() == 0.5
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Host)
            .where(Host.name == url_host(backing_off.urls(1)[0]))
            .values(backoff_until=now + timedelta(seconds=0.25), consecutive_failures=1)
        )
    assert parts.ledger.seconds_until_next_retry() == 0.25


def test_a_claim_says_it_passed_over_an_image_for_its_hosts_limit_even_a_single_one(parts_of, origins):
    """The image loop claims again as soon as the host's images in flight finish."""
    origin = start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=2)
    make_batch(parts.engine, origin.urls(3))
    claim = parts.ledger.claim_next(8)
    assert (len(claim.units), claim.passed_over_hosts) == (2, True)


def test_claiming_by_id_keeps_to_the_limit_too(parts_of, origins):
    origin = start_origin(origins)
    parts = parts_of(fetch_per_host_concurrency=2)
    _, ids = make_batch(parts.engine, origin.urls(4))
    assert parts.ledger.has_claimable_work() is True
    assert len(parts.ledger.claim_images(ids)) == 2
    assert parts.ledger.claim_images(ids) == []
    assert parts.ledger.has_claimable_work() is False  # the other two wait for the host's room


def test_an_image_claimed_by_id_is_not_claimed_again_while_its_lease_runs(parts_of, origins):
    origin = start_origin(origins)
    parts = parts_of()
    _, ids = make_batch(parts.engine, origin.urls(2))
    assert [unit.image_id for unit in parts.ledger.claim_images(ids[:1])] == ids[:1]
    assert [unit.image_id for unit in parts.ledger.claim_images(ids)] == ids[1:]
    assert image_row(parts.engine, ids[0]).attempts == 1


def test_a_429_puts_the_host_in_backoff_for_its_retry_after_and_the_image_back_to_wait(parts_of, origins):
    throttled = start_origin(origins, max_in_flight=0, retry_after="40")
    healthy = start_origin(origins)
    parts = parts_of()
    ledger = parts.ledger
    _, throttled_ids = make_batch(parts.engine, throttled.urls(3))
    _, healthy_ids = make_batch(parts.engine, healthy.urls(1))

    (unit,) = ledger.claim_images(throttled_ids[:1])
    before = utcnow()
    ledger.record_outcomes([parts.stages.run(unit)])

    image = image_row(parts.engine, unit.image_id)
    assert (image.status, image.error_code, image.attempts) == ("pending", "http_429", 1)
    assert timedelta(seconds=39) < image.retry_at - before <= timedelta(seconds=41)
    host = host_row(parts.engine, unit.host)
    assert host.backoff_until == image.retry_at and host.consecutive_failures == 1
    assert parts.metrics.registry.get_sample_value("image_service_host_backoffs_total") == 1
    # No image of the host is fetched before then; the other host's are.
    assert ledger.claim_images(throttled_ids) == []
    assert [u.image_id for u in ledger.claim_next(16).units] == healthy_ids
    assert 39 < ledger.seconds_until_next_retry() <= 40
    assert throttled.answered == {429: 1}
    with writer_sessionmaker(parts.engine)() as session:
        request = session.get(ProcessingRequest, image.request_pk)
        assert (request.status, request.failed_images) == ("processing", 0)


def test_retry_after_is_capped(parts_of, origins):
    origin = start_origin(origins, max_in_flight=0, retry_after="100000")
    parts = parts_of(fetch_retry_after_max_seconds=30)
    _, ids = make_batch(parts.engine, origin.urls(1))
    (unit,) = parts.ledger.claim_images(ids)
    before = utcnow()
    parts.ledger.record_outcomes([parts.stages.run(unit)])
    assert image_row(parts.engine, unit.image_id).retry_at - before <= timedelta(seconds=31)


def test_an_image_waits_for_its_origin_only_for_the_retry_window(parts_of, origins):
    origin = start_origin(origins)
    origin.down_for(3600)
    parts = parts_of(fetch_retry_window_seconds=900)
    request_pk, (image_id,) = make_batch(parts.engine, origin.urls(1))
    (unit,) = parts.ledger.claim_images([image_id])
    parts.ledger.record_outcomes([parts.stages.run(unit)])
    first = image_row(parts.engine, image_id)
    assert first.status == "pending" and first.waiting_since is not None

    # Within the window: it waits again, and the window still runs from the first failure.
    make_host_due(parts.engine, unit.host)
    (unit,) = parts.ledger.claim_images([image_id])
    parts.ledger.record_outcomes([parts.stages.run(unit)])
    assert image_row(parts.engine, image_id).status == "pending"
    assert image_row(parts.engine, image_id).waiting_since == first.waiting_since

    # 900 s after the first failure: the next failure is final, with the last error.
    with writer_sessionmaker(parts.engine).begin() as session:
        session.execute(
            update(Image).where(Image.id == image_id).values(waiting_since=utcnow() - timedelta(seconds=901))
        )
    make_host_due(parts.engine, unit.host)
    (unit,) = parts.ledger.claim_images([image_id])
    parts.ledger.record_outcomes([parts.stages.run(unit)])
    image = image_row(parts.engine, image_id)
    assert (image.status, image.error_code) == ("failed", "http_503")
    with writer_sessionmaker(parts.engine)() as session:
        assert session.get(ProcessingRequest, request_pk).status == "failed"


@pytest.mark.parametrize("window", [0, 1])
def test_with_a_short_retry_window_an_origins_failure_is_final_only_once_the_window_is_over(
    parts_of, origins, window
):
    """FETCH_RETRY_WINDOW_SECONDS=0 fails an image at its origin's first passing trouble;
    a window of a second still lets the image wait once."""
    origin = start_origin(origins)
    origin.down_for(3600)
    parts = parts_of(fetch_retry_window_seconds=window)
    _, (image_id,) = make_batch(parts.engine, origin.urls(1))
    (unit,) = parts.ledger.claim_images([image_id])
    parts.ledger.record_outcomes([parts.stages.run(unit)])
    image = image_row(parts.engine, image_id)
    assert (image.status, image.error_code) == ("failed" if window == 0 else "pending", "http_503")


def test_permanent_answers_fail_at_once(parts_of, origins):
    origin = start_origin(origins)
    parts = parts_of()
    _, (image_id,) = make_batch(parts.engine, [origin.base_url + "/missing.jpg"])
    origin.body = b"not an image"
    (unit,) = parts.ledger.claim_images([image_id])
    parts.ledger.record_outcomes([parts.stages.run(unit)])
    image = image_row(parts.engine, image_id)
    assert (image.status, image.error_code) == ("failed", "not_an_image")
    assert host_row(parts.engine, unit.host).backoff_until is None


def test_a_host_failing_round_after_round_gets_one_image_at_a_time_until_it_answers(parts_of, origins):
    origin = start_origin(origins)
    origin.down_for(3600)
    parts = parts_of(fetch_per_host_concurrency=3, fetch_breaker_failures=2)
    ledger = parts.ledger
    make_batch(parts.engine, origin.urls(10))
    host = f"127.0.0.1:{origin.port}"
    for failures in (1, 2):
        units = ledger.claim_next(16).units
        assert len(units) == 3
        ledger.record_outcomes([parts.stages.run(unit) for unit in units])
        assert host_row(parts.engine, host).consecutive_failures == failures  # one per round
        assert ledger.claim_next(16).units == []  # backing off
        make_host_due(parts.engine, host)

    (probe,) = ledger.claim_next(16).units  # the breaker is open: one probe
    assert ledger.claim_next(16).units == []
    origin.down_until = 0
    ledger.record_outcomes([parts.stages.run(probe)])
    assert host_row(parts.engine, host).consecutive_failures == 0
    assert len(ledger.claim_next(16).units) == 3
    assert origin.answered[503] == 6  # two rounds of three, none retried at once


# -- the whole service, in process -------------------------------------------------------


def run_service(settings) -> TestClient:
    return TestClient(create_app(settings))


def csv_for(urls: list[str]) -> bytes:
    return csv_of([(n, f"P{n}", [url]) for n, url in enumerate(urls, start=1)])


def test_the_origin_never_sees_more_than_the_per_host_limit(make_settings, origins):
    origin = start_origin(origins, delay_seconds=0.05)
    settings = allowing(make_settings, origins, fetch_per_host_concurrency=3, worker_concurrency=8)
    with run_service(settings) as client:
        request_id = upload(client, csv_for(origin.urls(40))).json()["request_id"]
        body = wait_finished(client, request_id, timeout=60)
    assert body["status"] == "completed"
    assert origin.most_in_flight == 3  # the limit, reached and held
    assert origin.answered == {200: 40}


def test_a_throttling_origin_loses_no_image(make_settings, origins):
    # The origin allows 2 at once and asks for a second's pause beyond that; the service
    # allows itself 8: it runs into 429s, backs off, and every image arrives.
    origin = start_origin(origins, delay_seconds=0.05, max_in_flight=2, retry_after="1")
    settings = allowing(make_settings, origins, fetch_per_host_concurrency=8, worker_concurrency=8)
    with run_service(settings) as client:
        request_id = upload(client, csv_for(origin.urls(40))).json()["request_id"]
        body = wait_finished(client, request_id, timeout=120)
        metrics = client.get("/metrics").text
    assert body["status"] == "completed", body["progress"]
    assert origin.answered[200] == 40 and origin.answered[429] > 0
    assert f'image_service_origin_slow_downs_total{{status="429"}} {float(origin.answered[429])}' in metrics
    assert "image_service_host_backoffs_total" in metrics


def test_an_origin_down_for_20_s_fails_nothing(make_settings, origins):
    origin = start_origin(origins, delay_seconds=0.01)
    settings = allowing(
        make_settings,
        origins,
        fetch_per_host_concurrency=8,
        fetch_host_backoff_base_seconds=0.5,
        fetch_host_backoff_max_seconds=4,
        fetch_breaker_failures=3,
        download_timeout_seconds=2,
    )
    origin.down_for(20)
    with run_service(settings) as client:
        request_id = upload(client, csv_for(origin.urls(40))).json()["request_id"]
        body = wait_finished(client, request_id, timeout=90)
    assert body["status"] == "completed", body["progress"]
    assert origin.answered[200] == 40
    # Down, the host cost 3 rounds of at most 8 requests, then its breaker let one probe
    # through per backoff (2-4 s from the fourth round on): not one request per image
    # per retry (rounds of 8 every 2-4 s would have sent over 50).
    assert 0 < origin.answered[503] <= 3 * 8 + 20 / 2 + 2


def test_a_throttled_host_holds_up_nobody_else(make_settings, origins):
    throttled = start_origin(origins, max_in_flight=0, retry_after="60")
    healthy = start_origin(origins, delay_seconds=0.02)
    settings = allowing(make_settings, origins, worker_concurrency=4)
    with run_service(settings) as client:
        slow_id = upload(client, csv_for(throttled.urls(20))).json()["request_id"]
        fast_id = upload(client, csv_for(healthy.urls(20))).json()["request_id"]
        fast = wait_finished(client, fast_id, timeout=60)
        slow = client.get(f"/status/{slow_id}").json()
        page = client.get(f"/requests/{slow_id}").text
    assert fast["status"] == "completed"
    assert slow["status"] == "processing" and slow["progress"]["failed_images"] == 0
    # One round of the per-host limit asked, then the host waits out its Retry-After.
    assert 0 < throttled.answered[429] <= settings.fetch_per_host_concurrency
    waiting = [
        image for product in slow["products"] for image in product["images"] if image["error"] is not None
    ]
    assert waiting and all(image["status"] == "pending" for image in waiting)
    assert all(image["error"]["code"] == "http_429" and image["retry_at"] for image in waiting)
    assert "request" in page  # the page itself renders; its wording is checked in test_pages


# -- two Celery workers on RabbitMQ ----------------------------------------------------------


@pytest.mark.slow
@NEEDS_POSTGRES
def test_the_per_host_limit_holds_across_two_celery_workers(deploy, origins, deployment_env):
    origin = start_origin(origins, delay_seconds=0.1)
    hosts = f"{deployment_env['ALLOW_PRIVATE_HOSTS']},127.0.0.1:{origin.port}"
    deployment = deploy(
        "celery-rabbitmq", workers=2, ALLOW_PRIVATE_HOSTS=hosts, FETCH_PER_HOST_CONCURRENCY="3"
    )
    started = time.monotonic()
    request_id = deployment.upload(csv_for(origin.urls(60)))
    state = deployment.wait_done(request_id, timeout=120)
    assert state.status == "completed", state
    assert origin.most_in_flight == 3, origin.most_in_flight
    assert origin.answered == {200: 60}
    assert time.monotonic() - started < 120
