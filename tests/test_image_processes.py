"""Image worker processes: the stages run outside the web process, and a worker that dies
costs no image and never leaves one stuck."""

import os
import signal
import threading
import time

from fastapi.testclient import TestClient

from app.main import create_app
from tests import images
from tests.conftest import csv_of
from tests.servers import send
from tests.test_api import upload, wait_finished


def hanging_until_released(release: threading.Event, started: threading.Semaphore):
    """Answers with a JPEG, but only once `release` is set; counts arrivals on `started`."""
    body = images.jpeg((320, 240))

    def handler(request):
        started.release()
        if not release.wait(timeout=30):
            return
        send(request, 200, body, {"Content-Type": "image/jpeg"})

    return handler


def kill_worker_holding_an_image(client: TestClient, started: threading.Semaphore) -> int:
    assert started.acquire(timeout=15), "the image was never requested"
    processes = client.app.state.runner.pipeline.stages
    (pid,) = processes.worker_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # wait until a replacement runs
        pids = processes.worker_pids()
        if pids and pid not in pids:
            return pid
        time.sleep(0.05)
    raise AssertionError("the dead worker was not replaced")


def test_stages_run_in_worker_processes(make_settings, image_server):
    settings = make_settings(image_processes=2)
    urls = [image_server.add(images.jpeg((640, 480))), image_server.add(b"<html>no</html>")]
    with TestClient(create_app(settings)) as client:
        workers = client.app.state.runner.pipeline.stages.worker_pids()
        request_id = upload(client, csv_of([(1, "A", urls)])).json()["request_id"]
        status = wait_finished(client, request_id)
    assert len(set(workers)) == 2 and os.getpid() not in workers
    good, bad = status["products"][0]["images"]
    assert (good["status"], good["width"], good["height"]) == ("succeeded", 640, 480)
    assert bad["error"]["code"] == "not_an_image"


def test_an_image_whose_worker_dies_is_claimed_again_and_finishes(make_settings, image_server):
    release, started = threading.Event(), threading.Semaphore(0)
    slow = image_server.add_handler(hanging_until_released(release, started))
    quick = image_server.add(images.jpeg())
    settings = make_settings(image_processes=1, worker_concurrency=2)
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [slow, quick])])).json()["request_id"]
        kill_worker_holding_an_image(client, started)
        release.set()
        status = wait_finished(client, request_id)
    assert status["status"] == "completed"
    assert [image["status"] for image in status["products"][0]["images"]] == ["succeeded", "succeeded"]
    assert image_server.hits_for(slow) == 2


def test_an_image_that_keeps_killing_workers_fails_alone(make_settings, image_server):
    release, started = threading.Event(), threading.Semaphore(0)
    poisonous = image_server.add_handler(hanging_until_released(release, started))
    settings = make_settings(image_processes=1, worker_concurrency=2)
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [poisonous])])).json()["request_id"]
        for _attempt in range(3):
            kill_worker_holding_an_image(client, started)
        status = wait_finished(client, request_id)
        release.set()
        # The service goes on working with its replacement worker.
        later = upload(client, csv_of([(1, "B", [image_server.add(images.jpeg())])])).json()["request_id"]
        assert wait_finished(client, later)["status"] == "completed"
    assert status["status"] == "failed"
    (image,) = status["products"][0]["images"]
    assert image["error"]["code"] == "worker_crashed"
    assert image_server.hits_for(poisonous) == 3


def test_a_worker_stuck_past_the_time_limit_is_replaced(make_settings, image_server, monkeypatch):
    from app.workers import processes

    # Downloads in tests time out after 5 s; make the limit 2 s so the hanging one is "stuck".
    monkeypatch.setattr(processes, "STUCK_AFTER_DOWNLOAD_SECONDS", -3.0)
    release, started = threading.Event(), threading.Semaphore(0)
    stuck = image_server.add_handler(hanging_until_released(release, started))
    settings = make_settings(image_processes=1, worker_concurrency=2)
    with TestClient(create_app(settings)) as client:
        (first_worker,) = client.app.state.runner.pipeline.stages.worker_pids()
        request_id = upload(client, csv_of([(1, "A", [stuck])])).json()["request_id"]
        assert started.acquire(timeout=15)
        assert started.acquire(timeout=15), "the image was not tried again after the worker was stopped"
        release.set()
        status = wait_finished(client, request_id)
        assert first_worker not in client.app.state.runner.pipeline.stages.worker_pids()
    assert status["status"] == "completed"
