"""A full disk makes images wait, not fail: the request stays unfinished, /readyz says
why, and the batch completes once space returns."""

import contextlib
import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.composition import stage_config
from app.main import create_app
from app.pipeline.stages import ImageStages
from app.storage.local import LocalFileStorage
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images
from tests.support.storage import FillableStorage


def wait_all_waiting(client: TestClient, request_id: str, timeout: float = 30) -> dict:
    """The status once every image has failed to store at least once and waits for a retry."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/status/{request_id}").json()
        statuses = [image for product in body["products"] for image in product["images"]]
        if all(image["error"] and image["error"]["code"] == "storage_error" for image in statuses):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"images did not all wait for a retry in {timeout} s: {statuses}")
        time.sleep(0.05)


def assert_waiting_for_storage(client: TestClient, request_id: str) -> None:
    status = wait_all_waiting(client, request_id)
    assert status["status"] == "processing"
    assert (status["progress"]["processed_images"], status["progress"]["failed_images"]) == (0, 0)
    for product in status["products"]:
        for image in product["images"]:
            assert image["status"] in ("pending", "processing")  # waiting, or being retried
            assert "No space left on device" in image["error"]["message"]
    ready = client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"
    assert "storage_error" in ready.json()["detail"]
    assert "No space left on device" in ready.json()["transient_failure"]


def assert_completed(client: TestClient, request_id: str, image_count: int, timeout: float = 30) -> None:
    status = wait_finished(client, request_id, timeout=timeout)
    assert status["status"] == "completed"
    assert status["progress"]["processed_images"] == image_count
    found = [image for product in status["products"] for image in product["images"]]
    assert len(found) == image_count
    assert all(image["status"] == "succeeded" and image["error"] is None for image in found)
    for image in found:
        assert client.get(image["output_url"].removeprefix("http://testserver")).status_code == 200
    assert client.get("/readyz").status_code == 200


def batch_of(image_server, products: int) -> bytes:
    return csv_of(
        [
            (
                n,
                f"P{n}",
                [image_server.add(images.jpeg((40 + n, 30))), image_server.add(images.png_rgba((30, 20)))],
            )
            for n in range(1, products + 1)
        ]
    )


def test_a_full_disk_delays_the_batch_until_space_returns(make_settings, image_server):
    # Leases and scans far apart: only the retry times can wake the runner in time.
    settings = make_settings(
        transient_retry_base_seconds=0.1,
        transient_retry_max_seconds=0.4,
        lease_seconds=90,
        recovery_interval_seconds=60,
    )
    storage = FillableStorage(settings.media_root)
    storage.full.set()
    stages = ImageStages.from_config(stage_config(settings), storage=storage)
    with TestClient(create_app(settings, stages=stages)) as client:
        assert client.get("/readyz").status_code == 200
        request_id = upload(client, batch_of(image_server, 3)).json()["request_id"]
        assert_waiting_for_storage(client, request_id)
        refused_while_full = storage.refused
        assert refused_while_full >= 6
        storage.full.clear()
        # Retries are due within 0.4 s; without waking for them the runner would next look
        # for work 30 s later (a third of the lease).
        assert_completed(client, request_id, 6, timeout=15)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(filesystem: Path) -> Path:
    """A file taking every free byte of the filesystem."""
    filler = filesystem / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk_size in (64 * 1024, 512):
            chunk = b"\0" * chunk_size
            while True:
                try:
                    os.write(descriptor, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(descriptor)
    return filler


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_real_full_filesystem_delays_the_batch_until_space_returns(make_settings, image_server, tmp_path):
    with small_tmpfs(tmp_path / "media", "1m") as media_root:
        settings = make_settings(
            media_root=media_root,
            transient_retry_base_seconds=0.1,
            transient_retry_max_seconds=0.4,
        )
        with TestClient(create_app(settings)) as client:
            filler = fill(media_root)
            request_id = upload(client, batch_of(image_server, 3)).json()["request_id"]
            assert_waiting_for_storage(client, request_id)
            filler.unlink()
            assert_completed(client, request_id, 6)
        assert len(list(media_root.glob(f"{request_id}/*.jpg"))) == 6


def test_a_starting_process_keeps_the_partial_files_of_live_writers(tmp_path):
    storage = LocalFileStorage(tmp_path)
    storage.save("r/1.jpg", b"x")  # makes the temporary folder
    host = socket.gethostname()
    dead_pid = 2**22 + 12345  # above pid_max's default: no such process
    live = storage.temp_dir / f"{host}-{os.getpid()}-abcdef12-0.part"
    dead = storage.temp_dir / f"{host}-{dead_pid}-abcdef12-0.part"
    foreign = storage.temp_dir / "elsewhere-77-abcdef12-0.part"
    for path in (live, dead, foreign):
        path.write_bytes(b"half an image")
    LocalFileStorage(tmp_path).remove_stale_temp_files()
    assert live.exists() and foreign.exists() and not dead.exists()
    old = time.time() - 2 * 3600
    os.utime(foreign, (old, old))
    LocalFileStorage(tmp_path).remove_stale_temp_files()
    assert not foreign.exists()


def test_an_unreachable_bucket_is_a_503_problem_not_a_500(make_settings, aws_environment):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = make_settings(
        storage_backend="s3", s3_bucket="outputs", s3_endpoint_url=f"http://127.0.0.1:{closed_port}"
    )
    with TestClient(create_app(settings)) as client:
        response = client.get("/thumbnails/0b6d3a52-3c57-4a5e-8a55-2f0a9f1e3d11/1.jpg")
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/problem+json"
    assert "storage" in response.json()["detail"]
