"""Image worker processes: the stages run outside the web process, and a worker that dies
costs no image and never leaves one stuck."""

import multiprocessing.context
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import Image
from app.db.session import build_engine
from app.main import create_app
from tests.conftest import csv_of
from tests.support import images
from tests.support.servers import send
from tests.support.service_process import ServiceProcess
from tests.test_api import upload, wait_finished

pytestmark = pytest.mark.slow


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
    processes = client.app.state.runner.stages
    (pid,) = processes.worker_pids()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # wait until a replacement runs
        pids = processes.worker_pids()
        if pids and pid not in pids:
            return pid
        time.sleep(0.05)
    raise AssertionError("the dead worker was not replaced")


def kill_worker_decoding(client: TestClient) -> set[tuple[int, int]]:
    """SIGKILL the worker as soon as it is decoding; returns the units it was decoding."""
    processes = client.app.state.runner.stages
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for pid, decoding in processes.units_decoding().items():
            if decoding:
                os.kill(pid, signal.SIGKILL)
                while time.monotonic() < deadline:  # wait until a replacement runs
                    pids = processes.worker_pids()
                    if pids and pid not in pids:
                        return decoding
                    time.sleep(0.05)
                raise AssertionError("the dead worker was not replaced")
        time.sleep(0.001)
    raise AssertionError("no worker started decoding")


def crash_counts(database_url: str) -> dict[str, int]:
    engine = build_engine(database_url)
    with engine.connect() as connection:
        counts = dict(connection.execute(select(Image.input_url, Image.crash_count)).all())
    engine.dispose()
    return counts


def test_stages_run_in_worker_processes_at_a_lower_cpu_priority(make_settings, image_server):
    settings = make_settings(image_processes=2, image_process_niceness=7)
    urls = [image_server.add(images.jpeg((640, 480))), image_server.add(b"<html>no</html>")]
    with TestClient(create_app(settings)) as client:
        workers = client.app.state.runner.stages.worker_pids()
        niceness = {os.getpriority(os.PRIO_PROCESS, pid) for pid in workers}
        request_id = upload(client, csv_of([(1, "A", urls)])).json()["request_id"]
        status = wait_finished(client, request_id)
    assert len(set(workers)) == 2 and os.getpid() not in workers
    assert niceness == {min(19, os.getpriority(os.PRIO_PROCESS, 0) + 7)}
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
    poisonous = image_server.add(images.slow_to_decode())
    settings = make_settings(image_processes=1, worker_concurrency=2)
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [poisonous])])).json()["request_id"]
        for _attempt in range(3):
            kill_worker_decoding(client)
        status = wait_finished(client, request_id)
        # The service goes on working with its replacement worker.
        later = upload(client, csv_of([(1, "B", [image_server.add(images.jpeg())])])).json()["request_id"]
        assert wait_finished(client, later)["status"] == "completed"
    assert status["status"] == "failed"
    (image,) = status["products"][0]["images"]
    assert image["error"]["code"] == "worker_crashed"
    assert image_server.hits_for(poisonous) == 3


def test_a_worker_stuck_past_the_time_limit_is_replaced(make_settings, image_server, monkeypatch):
    from app.pipeline import processes

    # Downloads in tests time out after 5 s; make the limit 2 s so the hanging one is "stuck".
    monkeypatch.setattr(processes, "STUCK_AFTER_DOWNLOAD_SECONDS", -3.0)
    release, started = threading.Event(), threading.Semaphore(0)
    stuck = image_server.add_handler(hanging_until_released(release, started))
    settings = make_settings(image_processes=1, worker_concurrency=2)
    with TestClient(create_app(settings)) as client:
        (first_worker,) = client.app.state.runner.stages.worker_pids()
        request_id = upload(client, csv_of([(1, "A", [stuck])])).json()["request_id"]
        assert started.acquire(timeout=15)
        assert started.acquire(timeout=15), "the image was not tried again after the worker was stopped"
        release.set()
        status = wait_finished(client, request_id)
        assert first_worker not in client.app.state.runner.stages.worker_pids()
    assert status["status"] == "completed"


def test_a_dead_worker_charges_only_the_image_it_was_decoding(make_settings, image_server, database_url):
    release, started = threading.Event(), threading.Semaphore(0)
    downloading = [image_server.add_handler(hanging_until_released(release, started)) for _ in range(2)]
    poisonous = image_server.add(images.slow_to_decode())
    settings = make_settings(image_processes=1, worker_concurrency=4)
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [*downloading, poisonous])])).json()["request_id"]
        assert started.acquire(timeout=15) and started.acquire(timeout=15)
        kill_worker_decoding(client)
        release.set()
        status = wait_finished(client, request_id)
    assert status["status"] == "completed"
    assert crash_counts(database_url) == {downloading[0]: 0, downloading[1]: 0, poisonous: 1}
    assert [image_server.hits_for(url) for url in downloading] == [2, 2]


def test_a_worker_killed_in_the_middle_of_an_answer_costs_only_its_own_images(make_settings, image_server):
    urls = [image_server.add(images.jpeg((64 + n, 48))) for n in range(12)]
    settings = make_settings(image_processes=2, worker_concurrency=4)
    with TestClient(create_app(settings)) as client:
        victim = client.app.state.runner.stages.worker_pids()[0]
        for pipe in pipes_to_us(victim):
            with open(pipe, "wb", buffering=0) as writer:
                writer.write((4096).to_bytes(4, "big") + b"half an outcome")  # a frame cut short
        os.kill(victim, signal.SIGKILL)
        request_id = upload(client, csv_of([(n + 1, f"P{n}", [url]) for n, url in enumerate(urls)])).json()[
            "request_id"
        ]
        status = wait_finished(client, request_id)
    assert status["status"] == "completed"


def pipes_to_us(pid: int) -> list[Path]:
    """The worker's descriptors that write into pipes this (web) process reads from: its
    answers, and the pipe multiprocessing watches for its exit."""
    ours = {os.stat(link).st_ino for link in Path("/proc/self/fd").iterdir() if is_pipe(link, os.O_RDONLY)}
    return [
        link
        for link in Path(f"/proc/{pid}/fd").iterdir()
        if is_pipe(link, os.O_WRONLY) and os.stat(link).st_ino in ours
    ]


def is_pipe(link: Path, access: int) -> bool:
    try:
        if not os.readlink(link).startswith("pipe:"):
            return False
        flags = int((link.parent.parent / "fdinfo" / link.name).read_text().split()[3], 8)
    except (FileNotFoundError, IndexError):
        return False
    return flags & os.O_ACCMODE == access


def test_units_are_handed_back_while_no_worker_can_be_started(
    make_settings, image_server, database_url, monkeypatch
):
    release, started = threading.Event(), threading.Semaphore(0)
    url = image_server.add_handler(hanging_until_released(release, started))
    settings = make_settings(image_processes=1, worker_concurrency=2)
    engine = build_engine(database_url)
    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of([(1, "A", [url])])).json()["request_id"]
        assert started.acquire(timeout=15)

        def refuse(process):
            raise OSError("no more processes")

        monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", refuse)
        (pid,) = client.app.state.runner.stages.worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        with engine.connect() as connection:
            while connection.scalar(select(Image.attempts)) < 2:  # handed back and claimed again
                assert time.monotonic() < deadline, "the image stayed with the dead worker"
                time.sleep(0.05)
                connection.rollback()
        monkeypatch.undo()
        release.set()
        status = wait_finished(client, request_id)
    engine.dispose()
    assert status["status"] == "completed"
    assert image_server.hits_for(url) == 2


def children_of(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc: Linux)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has gone
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_stopping_the_service_leaves_no_leaked_semaphores(database_url, tmp_path):
    log = tmp_path / "service.log"
    env = {"DATABASE_URL": database_url, "MEDIA_ROOT": str(tmp_path / "media"), "IMAGE_PROCESSES": "2"}
    service = ServiceProcess(env, log).start()
    try:
        # The worker processes and multiprocessing's resource tracker, which reports leaks
        # into the same log when the service has gone.
        writers = children_of(service.process.pid)
        assert len(writers) >= 3, writers
        assert service.terminate() in (0, -signal.SIGTERM)
    finally:
        service.stop()
    deadline = time.monotonic() + 30
    while alive := [pid for pid in writers if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, f"processes {alive} outlived the service"
        time.sleep(0.05)
    assert b"Application shutdown complete" in log.read_bytes()
    assert b"leaked" not in log.read_bytes()
