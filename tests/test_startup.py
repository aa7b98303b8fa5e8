"""What the processes say when they start and stop, as an operator meets them: `python -m
app` (`make run`) and `python -m app.runners` (`make worker`) started for real, their
output read, their exit status checked."""

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import kombu
import psycopg2
import pytest
from amqp.exceptions import NotFound

from app.config import PROJECT_ROOT
from tests.support.deployment import RABBITMQ_URL
from tests.support.service_process import ServiceProcess, free_port

pytestmark = pytest.mark.slow

POSTGRES_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
START_SECONDS = 60


def postgres_answers() -> bool:
    try:
        psycopg2.connect(
            host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3
        ).close()
    except psycopg2.Error:
        return False
    return True


NEEDS_POSTGRES_SERVER = pytest.mark.skipif(
    not postgres_answers(), reason="needs the PostgreSQL server on 127.0.0.1:5432"
)


def run(command: list[str], env: dict[str, str], cwd: Path = PROJECT_ROOT, timeout: float = START_SECONDS):
    return subprocess.run(
        command, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout
    )


def missing_database_url() -> str:
    return f"{POSTGRES_SERVER}/missing_{uuid.uuid4().hex[:12]}"


@NEEDS_POSTGRES_SERVER
def test_the_api_names_a_missing_database_in_one_line_and_exits(tmp_path):
    url = missing_database_url()
    database = url.rsplit("/", 1)[1]
    result = run([sys.executable, "-m", "app"], {"DATABASE_URL": url, "MEDIA_ROOT": str(tmp_path)})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"database {database} does not exist" in line
    assert f"createdb -h 127.0.0.1 -p 5432 -U postgres {database}" in line


@NEEDS_POSTGRES_SERVER
def test_a_worker_names_a_missing_database_in_one_line_and_exits(tmp_path):
    url = missing_database_url()
    env = {"DATABASE_URL": url, "TASK_BACKEND": "celery", "MEDIA_ROOT": str(tmp_path)}
    result = run([sys.executable, "-m", "app.runners"], env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"database {url.rsplit('/', 1)[1]} does not exist" in line


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"TASK_BACKEND": "inprocess"}, "TASK_BACKEND=celery"),
        ({"TASK_BACKEND": "celery", "DATABASE_URL": "sqlite:///./data/images.db"}, "SQLite"),
    ],
    ids=["inprocess", "sqlite"],
)
def test_a_worker_refuses_settings_no_api_would_publish_to(settings, named, tmp_path):
    result = run([sys.executable, "-m", "app.runners"], {"MEDIA_ROOT": str(tmp_path), **settings})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("the ") and "cannot start" in line and named in line


def test_the_api_logs_an_unusable_storage_at_start_up(tmp_path):
    """A bucket that does not exist (nothing listens on the endpoint either): an ERROR
    line at start-up, not only a red /readyz."""
    env = {
        "STORAGE_BACKEND": "s3",
        "S3_BUCKET": "no-such-bucket",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9",  # the discard port: refused
        "AWS_ACCESS_KEY_ID": "key",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_EC2_METADATA_DISABLED": "true",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'images.db'}",
        "MEDIA_ROOT": str(tmp_path / "media"),
        "PORT": str(free_port()),
    }
    log = tmp_path / "api.log"
    process = start_group([sys.executable, "-m", "app"], env, log)
    try:
        wait_for_line(log, "Application startup complete", process)
    finally:
        stop_group(process)
    lines = log.read_text().splitlines()
    assert any(" ERROR " in line and "storage check at start-up" in line for line in lines), lines


def test_the_api_ignores_a_dotenv_when_env_file_is_empty(tmp_path, database_url):
    """ENV_FILE empty (conftest sets it for every process the tests start): a hostile .env
    in the working directory changes nothing."""
    (tmp_path / ".env").write_text("TASK_BACKEND=celery\nLOG_LEVEL=nonsense\nAPI_KEYS=hostile\n")
    env = {
        "DATABASE_URL": database_url,
        "MEDIA_ROOT": str(tmp_path / "media"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    service = ServiceProcess(env, tmp_path / "api.log", cwd=tmp_path)
    try:
        service.start()
        assert service.get("/requests").status_code == 200  # no API key asked for
    finally:
        service.stop()


def test_env_file_names_the_dotenv_the_settings_read(tmp_path):
    (tmp_path / "service.env").write_text("LOG_LEVEL=nonsense\n")
    result = run([sys.executable, "-m", "app"], {"ENV_FILE": str(tmp_path / "service.env")})
    assert result.returncode != 0
    assert "LOG_LEVEL" in result.stderr


# -- stopping ---------------------------------------------------------------------------


def start_group(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as output:
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_group(process: subprocess.Popen) -> None:
    """SIGKILL to the group started here, if it still runs; by its PID."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_for_line(log: Path, text: str, process: subprocess.Popen, seconds: float = START_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before {text!r}: {log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"no {text!r} within {seconds} s: {log.read_text()}")


def test_sigterm_to_the_api_group_is_a_quiet_stop(tmp_path, database_url):
    """A service manager stops the whole process group: the image worker processes get
    SIGTERM too. Nothing is logged as an error and the API shuts down in order (uvicorn
    then ends by the signal it received, as a process stopped by a signal does)."""
    log = tmp_path / "api.log"
    service = ServiceProcess(
        {"DATABASE_URL": database_url, "MEDIA_ROOT": str(tmp_path / "media"), "IMAGE_PROCESSES": "2"}, log
    )
    process = start_group([sys.executable, "-m", "app"], service.env, log)
    try:
        wait_for_line(log, "Application startup complete", process)
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        stop_group(process)
    text = log.read_text()
    assert "Application shutdown complete" in text, text
    assert " ERROR " not in text, text


@pytest.mark.skipif(
    not os.environ.get("TEST_DATABASE_URL", "").startswith("postgresql"),
    reason="a Celery worker needs PostgreSQL (TEST_DATABASE_URL)",
)
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_worker_stopped_on_request_exits_0_quietly(stop_signal, tmp_path, database_url):
    """Ctrl-C reaches the whole foreground group (make, the worker, its image processes),
    as SIGTERM from a service manager does."""
    log = tmp_path / "worker.log"
    env = {
        "DATABASE_URL": database_url,
        "MEDIA_ROOT": str(tmp_path / "media"),
        "TASK_BACKEND": "celery",
        "CELERY_BROKER_URL": RABBITMQ_URL,
        "CELERY_QUEUE": f"test-{uuid.uuid4().hex[:12]}",
        "IMAGE_PROCESSES": "2",
    }
    process = start_group([sys.executable, "-m", "app.runners"], env, log)
    try:
        wait_for_line(log, " ready.", process)
        os.killpg(process.pid, stop_signal)
        assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        stop_group(process)
        with kombu.Connection(RABBITMQ_URL) as connection, contextlib.suppress(NotFound):
            connection.default_channel.queue_delete(env["CELERY_QUEUE"])
    text = log.read_text()
    assert " ERROR " not in text and "Traceback" not in text, text
