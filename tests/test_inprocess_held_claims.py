"""The in-process runner's bookkeeping of the claims it holds, with stages the test
controls (the runner, not the stages, is under test)."""

import queue
import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta

from sqlalchemy import select, update

from app.composition import Parts, build_parts
from app.db.base import utcnow
from app.db.models import Image
from app.db.session import writer_sessionmaker
from app.ledger.units import ImageOutcome, WorkUnit
from app.runners.inprocess import InProcessRunner
from tests.test_process import make_batch


class StagesHeldByTheTest:
    """Each claim waits until the test lets its attempt go, then succeeds."""

    def __init__(self):
        self.started: queue.Queue[WorkUnit] = queue.Queue()
        self.let_go: defaultdict[int, threading.Event] = defaultdict(threading.Event)

    def run(self, unit: WorkUnit) -> ImageOutcome:
        self.started.put(unit)
        self.let_go[unit.attempt].wait(timeout=30)
        return ImageOutcome(unit, output_key=f"{unit.request_id}/{unit.image_id}.jpg")

    def close(self) -> None:
        pass


def claimed_at(engine, image_id: int) -> datetime:
    with writer_sessionmaker(engine)() as session:
        return session.scalar(select(Image.claimed_at).where(Image.id == image_id))


def backdate_claim(engine, image_id: int, seconds: float) -> None:
    with writer_sessionmaker(engine).begin() as session:
        session.execute(
            update(Image).where(Image.id == image_id).values(claimed_at=utcnow() - timedelta(seconds=seconds))
        )


def held_runner(settings) -> tuple[StagesHeldByTheTest, Parts, InProcessRunner, int]:
    """An in-process runner (not started) whose images run until the test lets them go,
    and the id of the one image of a batch waiting for it."""
    stages = StagesHeldByTheTest()
    services = build_parts(settings, runs_images=True, stages=stages)
    runner = InProcessRunner.from_parts(services)
    _, (image_id,) = make_batch(services.engine, [(1, "A", ["http://127.0.0.1:9/a.jpg"])])
    return stages, services, runner, image_id


def test_a_late_outcome_of_an_old_claim_leaves_the_new_claim_renewed(make_settings):
    settings = make_settings(lease_seconds=6, recovery_interval_seconds=0.1)
    stages, services, runner, image_id = held_runner(settings)
    engine = services.engine
    runner.start()
    try:
        first = stages.started.get(timeout=10)
        # The heartbeat stalls past the lease (the claim is backdated): the runner's own
        # feeder takes the image back and claims it again while the old claim runs on.
        deadline = time.monotonic() + 10
        while True:
            backdate_claim(engine, image_id, settings.lease_seconds + 1)
            try:
                second = stages.started.get(timeout=0.5)
                break
            except queue.Empty:
                assert time.monotonic() < deadline, "the expired claim was not taken back"
        assert second.attempt == first.attempt + 1
        stages.let_go[first.attempt].set()  # the old claim's outcome arrives, and is ignored
        # Handled once the old claim alone has left the claims the runner holds.
        deadline = time.monotonic() + 10
        while [unit.attempt for unit in runner._held.units()] != [second.attempt]:
            assert time.monotonic() < deadline, [unit.attempt for unit in runner._held.units()]
            time.sleep(0.02)

        backdated = utcnow() - timedelta(seconds=settings.lease_seconds / 2)
        backdate_claim(engine, image_id, settings.lease_seconds / 2)
        deadline = time.monotonic() + settings.lease_seconds / 3 + 3
        while claimed_at(engine, image_id) < backdated + timedelta(seconds=1):
            assert time.monotonic() < deadline, "the heartbeat no longer renews the new claim"
            time.sleep(0.1)
        assert stages.started.empty()  # never claimed a third time
    finally:
        for attempt in range(1, 4):
            stages.let_go[attempt].set()
        runner.stop()
        services.close()


def test_an_image_still_running_when_the_grace_runs_out_is_handed_back_not_recorded(make_settings):
    settings = make_settings(shutdown_grace_seconds=0.5)
    stages, services, runner, image_id = held_runner(settings)
    engine = services.engine
    runner.start()
    try:
        unit = stages.started.get(timeout=10)
        runner.stop()
        # Nothing of the runner's is left to record the late outcome.
        assert not any(thread.is_alive() for thread in runner._threads)
        stages.let_go[unit.attempt].set()
        with writer_sessionmaker(engine)() as session:
            image = session.get(Image, image_id)
            assert (image.status, image.claimed_at) == ("pending", None)
    finally:
        for attempt in range(1, 3):
            stages.let_go[attempt].set()
        services.close()


def test_images_held_when_the_image_loop_fails_are_handed_back_and_run_again(make_settings):
    settings = make_settings(recovery_interval_seconds=0.1)
    stages, services, runner, image_id = held_runner(settings)
    engine = services.engine
    claim_next = services.ledger.claim_next
    failed = threading.Event()

    def claim_failing_once(*args, **kwargs):
        if not failed.is_set():
            failed.set()
            raise ConnectionError("the database went away")
        return claim_next(*args, **kwargs)

    runner.start()
    try:
        first = stages.started.get(timeout=10)
        # The loop's next claim (every 0.1 s) fails while the image runs: the loop dies
        # and is started again.
        services.ledger.claim_next = claim_failing_once
        assert failed.wait(timeout=10)
        stages.let_go[first.attempt].set()
        # Handed back, not renewed for ever: the restarted loop claims it again.
        second = stages.started.get(timeout=15)
        assert (second.image_id, second.attempt) == (image_id, first.attempt + 1)
        stages.let_go[second.attempt].set()
        deadline = time.monotonic() + 10
        while True:
            with writer_sessionmaker(engine)() as session:
                if session.get(Image, image_id).status == "succeeded":
                    break
            assert time.monotonic() < deadline, "the image was never recorded"
            time.sleep(0.05)
        assert runner._held.units() == []
    finally:
        for attempt in range(1, 4):
            stages.let_go[attempt].set()
        runner.stop()
        services.close()
