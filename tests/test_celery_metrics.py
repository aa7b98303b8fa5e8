"""A Celery worker serves its own metrics on METRICS_PORT (PostgreSQL only: Celery
refuses SQLite). No broker is needed: the worker's runtime is started as worker_init
starts it, and nothing is published."""

import logging
import socket

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import make_url

import app.runners.celery_worker as celery_worker


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_celery_worker_serves_its_metrics_on_metrics_port(make_settings, database_url, monkeypatch):
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("TASK_BACKEND=celery needs PostgreSQL (TEST_DATABASE_URL)")
    port = free_port()
    settings = make_settings(task_backend="celery", metrics_port=port, host="127.0.0.1")
    monkeypatch.setattr(celery_worker, "settings", settings)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    celery_worker._start_runtime()  # configures logging as a worker does
    try:
        response = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        names = {family.name for family in text_string_to_metric_families(response.text)}
        assert {"image_service_images", "image_service_stage_seconds", "image_service_bytes"} <= names
    finally:
        celery_worker._stop_runtime()
        monkeypatch.setattr(celery_worker, "_runtime", None)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
