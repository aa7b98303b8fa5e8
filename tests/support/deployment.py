"""A whole deployment of the service as real processes, for crash and fault tests.

    inprocess          the API process (`python -m app`) does the work itself
    celery-rabbitmq    the API publishes hints on RabbitMQ; N Celery workers
    celery-redis       the same on Redis

Settings reach every process as environment variables, as in production. Each Celery
deployment has a queue of its own (a RabbitMQ queue name, a Redis queue name in a Redis
database of the tests' own), so runs never see each other's messages. stop() ends every
process it started, by PID, and the image worker processes they started.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import kombu
import pytest
import redis
from amqp.exceptions import NotFound
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook

from app.config import PROJECT_ROOT
from app.db.models import Image, ProcessingRequest, WebhookEvent
from app.db.session import build_engine
from app.runners.__main__ import worker_command
from app.storage import thumbnail_key
from tests.conftest import csv_of
from tests.support import images
from tests.support.servers import delayed
from tests.support.service_process import ServiceProcess

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672//"
# The tests own Redis databases 10-15; the brokers' tests use this one (FLUSHDB included).
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "12"))
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
BROKER_URLS = {"celery-rabbitmq": RABBITMQ_URL, "celery-redis": REDIS_URL}
READY_TIMEOUT_SECONDS = 60
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
FINISHED = {"completed", "completed_with_errors", "failed"}


def test_database_is_postgres() -> bool:
    url = os.environ.get("TEST_DATABASE_URL")
    return bool(url) and make_url(url).get_backend_name() == "postgresql"


NEEDS_POSTGRES = pytest.mark.skipif(
    not test_database_is_postgres(),
    reason="Celery runners need PostgreSQL: set TEST_DATABASE_URL=postgresql+psycopg2://... "
    "(TASK_BACKEND=celery refuses SQLite)",
)
CELERY_RUNNERS = [pytest.param(name, marks=NEEDS_POSTGRES) for name in BROKER_URLS]
RUNNERS = [pytest.param("inprocess"), *CELERY_RUNNERS]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of pid (Linux /proc), children first."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def _kill_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# What `make worker` runs: the node name is the worker's own choice (unique on the host).
MAKE_WORKER_COMMAND = [sys.executable, "-m", "app.runners"]


class WorkerProcess:
    """One Celery worker with the node name given, or, without one, `make worker`'s
    command choosing its own."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str | None):
        self.env = env
        self.log_path = log_path
        self.name = name
        self.process: subprocess.Popen | None = None
        self._log_offset = 0
        self._children: list[int] = []

    def spawn(self) -> None:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        command = MAKE_WORKER_COMMAND if self.name is None else worker_command(self.name, [])
        self.process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=log,
            stderr=log,
        )
        log.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}; see {self.log_path}")
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                if b" ready." in log.read():
                    self._children = _descendants(self.process.pid)
                    return
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} was not ready within {timeout} s; see {self.log_path}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash. Its image worker processes see
        their pipes close and exit by themselves, as they would in production."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def begin_stop(self) -> None:
        """SIGTERM, Celery's warm shutdown: running tasks finish, claims are handed back."""
        if self.running:
            self._children = sorted({*self._children, *_descendants(self.process.pid)})
            self.process.send_signal(signal.SIGTERM)

    def finish_stop(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        # Image worker processes outlive a killed parent only until they see its pipe close.
        _kill_pids([pid for pid in self._children if _alive_child_of_ours(pid)])


def _alive_child_of_ours(pid: int) -> bool:
    """pid is still one of the image worker processes (not a recycled PID)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return sys.executable.encode() in cmdline and b"multiprocessing" in cmdline


@dataclass
class RequestState:
    status: str
    total: int
    processed: int
    failed: int

    @property
    def done(self) -> int:
        return self.processed + self.failed


class Deployment:
    """The API and, for Celery, `workers` worker processes, all with the same settings."""

    def __init__(self, runner: str, env: dict[str, str], log_dir: Path, *, workers: int = 2):
        if runner not in ("inprocess", *BROKER_URLS):
            raise ValueError(f"unknown runner {runner!r}")
        self.runner = runner
        self.log_dir = log_dir
        self.database_url = env["DATABASE_URL"]
        self.queue = f"test-{uuid.uuid4().hex[:12]}"
        self.broker_url = BROKER_URLS.get(runner, "")
        env = {**env, "TASK_BACKEND": "inprocess"}
        if self.celery:
            env |= {
                "TASK_BACKEND": "celery",
                "CELERY_BROKER_URL": self.broker_url,
                "CELERY_QUEUE": self.queue,
            }
        self.api = ServiceProcess(env, log_dir / "api.log")
        # The workers build URLs (webhook payloads) from the API's public address.
        self.worker_env = dict(self.api.env)
        self.workers: list[WorkerProcess] = []
        self._initial_workers = workers if self.celery else 0
        self._engine = build_engine(self.database_url)

    @property
    def celery(self) -> bool:
        return self.runner != "inprocess"

    # -- processes ------------------------------------------------------------------------

    def start(self) -> "Deployment":
        self.start_api()
        for _ in range(self._initial_workers):
            self._spawn_worker()
        for worker in self.workers:
            worker.wait_ready()
        return self

    def start_api(self) -> ServiceProcess:
        return self.api.start()

    def kill_api(self) -> None:
        self.api.kill()

    def start_worker(self, named: bool = True) -> int:
        """Start a worker and wait until it is ready; `named=False` starts it as `make
        worker` does, naming itself."""
        worker = self._spawn_worker(named)
        worker.wait_ready()
        return len(self.workers) - 1

    def kill_worker(self, index: int) -> None:
        self.workers[index].kill()

    def _spawn_worker(self, named: bool = True) -> WorkerProcess:
        if not self.celery:
            raise RuntimeError("an in-process deployment has no workers: its API does the work")
        index = len(self.workers)
        name = f"w{index}-{self.queue}@127.0.0.1" if named else None
        worker = WorkerProcess(self.worker_env, self.log_dir / f"worker-{index}.log", name)
        worker.spawn()
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        for worker in self.workers:  # all at once: each waits for its running tasks
            worker.begin_stop()
        api_children = _descendants(self.api.process.pid) if self.api.process else []
        self.api.stop()
        _kill_pids([pid for pid in api_children if _alive_child_of_ours(pid)])
        for worker in self.workers:
            worker.finish_stop()
        if self.celery:
            self._delete_queue()
        self._engine.dispose()

    def __enter__(self) -> "Deployment":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- the broker -----------------------------------------------------------------------

    def purge_queue(self) -> int:
        """Empty the broker: RabbitMQ drops the queue's ready messages (a message a worker
        holds unacknowledged stays with it); Redis loses the whole database, unacknowledged
        messages and the queue's binding included. Returns the messages RabbitMQ dropped."""
        if self.runner == "celery-redis":
            redis.Redis.from_url(self.broker_url).flushdb()
            return 0
        with kombu.Connection(self.broker_url) as connection:
            try:
                return connection.default_channel.queue_purge(self.queue) or 0
            except NotFound:
                return 0

    def _delete_queue(self) -> None:
        if self.runner == "celery-redis":
            # The queue, its bindings, and the messages a killed worker left unacknowledged
            # (kombu would put them back in an hour, into a queue nobody reads).
            client = redis.Redis.from_url(self.broker_url)
            for key in client.scan_iter(match=f"*{self.queue}*"):
                client.delete(key)
            for tag, value in client.hscan_iter("unacked"):
                _message, exchange, routing_key = json.loads(value)
                if self.queue in (exchange, routing_key):
                    client.hdel("unacked", tag)
                    client.zrem("unacked_index", tag)
            return
        with kombu.Connection(self.broker_url) as connection, contextlib.suppress(NotFound):
            connection.default_channel.queue_delete(self.queue)

    # -- the API ----------------------------------------------------------------------------

    def upload(self, csv_bytes: bytes, webhook_url: str | None = None) -> str:
        data = {"webhook_url": webhook_url} if webhook_url else {}
        accepted = self.api.post(
            "/upload", files={"file": ("products.csv", csv_bytes, "text/csv")}, data=data
        )
        assert accepted.status_code == 202, accepted.text
        return accepted.json()["request_id"]

    # -- what the database says -----------------------------------------------------------

    def request_state(self, request_id: str) -> RequestState:
        with self._engine.connect() as connection:
            row = connection.execute(
                select(
                    ProcessingRequest.status,
                    ProcessingRequest.total_images,
                    ProcessingRequest.succeeded_images,
                    ProcessingRequest.failed_images,
                ).where(ProcessingRequest.request_id == request_id)
            ).one()
        return RequestState(*row)

    def wait_done(self, request_id: str, at_least: int | None = None, timeout: float = 120) -> RequestState:
        """Until at_least images are done (processed or failed), or the request finished."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.request_state(request_id)
            if state.status in FINISHED or (at_least is not None and state.done >= at_least):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"{request_id}: not there in {timeout} s: {state}; see {self.log_dir}")
            time.sleep(0.05)

    def output_keys(self, request_id: str) -> list[str | None]:
        with self._engine.connect() as connection:
            return list(
                connection.scalars(
                    select(Image.output_key)
                    .join(ProcessingRequest, Image.request_pk == ProcessingRequest.id)
                    .where(ProcessingRequest.request_id == request_id)
                )
            )

    def webhook_events(self, request_id: str) -> list[tuple[str, str, int]]:
        """(webhook id, state, attempts) of the request's webhook events."""
        with self._engine.connect() as connection:
            return [
                tuple(row)
                for row in connection.execute(
                    select(WebhookEvent.webhook_id, WebhookEvent.state, WebhookEvent.attempts)
                    .join(ProcessingRequest, WebhookEvent.request_pk == ProcessingRequest.id)
                    .where(ProcessingRequest.request_id == request_id)
                )
            ]

    def claimed_again(self, request_id: str) -> int:
        """Images of the request claimed more than once: their first claim was lost with
        a process that died holding it (or its lease ran out)."""
        with self._engine.connect() as connection:
            return connection.scalar(
                select(func.count())
                .select_from(Image)
                .join(ProcessingRequest, Image.request_pk == ProcessingRequest.id)
                .where(ProcessingRequest.request_id == request_id, Image.attempts > 1)
            )


# -- batches and checks -------------------------------------------------------------------


def slow_batch(image_server, count: int, delay_seconds: float, per_row: int = 3) -> bytes:
    """A CSV of `count` distinct small JPEGs, each served after `delay_seconds`."""

    urls = [
        image_server.add_handler(delayed(images.jpeg((48 + n % 64, 32 + n // 64)), delay_seconds))
        for n in range(count)
    ]
    rows = [urls[start : start + per_row] for start in range(0, count, per_row)]
    return csv_of([(number + 1, f"P{number + 1}", row) for number, row in enumerate(rows)])


def local_stored_keys(media_root: Path) -> list[str]:
    """Every output file under MEDIA_ROOT, as its storage key; never temporary files."""
    return sorted(
        path.relative_to(media_root).as_posix()
        for path in media_root.rglob("*.jpg")
        if not path.relative_to(media_root).parts[0].startswith(".")
    )


def assert_completed_with_one_output_each(
    deployment: Deployment, request_id: str, image_count: int, stored_keys: list[str]
) -> None:
    """The request completed, each image has its own output key, and the storage holds
    exactly those outputs, one file or object per image, each with its thumbnail beside
    it, nothing more."""
    state = deployment.request_state(request_id)
    assert (state.status, state.processed, state.failed) == ("completed", image_count, 0), state
    keys = deployment.output_keys(request_id)
    assert None not in keys
    assert len(keys) == len(set(keys)) == image_count
    assert len(stored_keys) == len(set(stored_keys))
    outputs = [key for key in stored_keys if "/thumbs/" not in key]
    assert sorted(outputs) == sorted(keys)
    thumbnails = [key for key in stored_keys if "/thumbs/" in key]
    assert sorted(thumbnails) == sorted(
        thumbnail_key(request_id, int(key.split("/")[1].split(".")[0])) for key in keys
    )


def assert_webhook_delivered_once(
    deployment: Deployment, receiver, hook: str, request_id: str, quiet_seconds: float = 1.0
) -> None:
    """One webhook event for the request, delivered in one attempt: the receiver got one
    POST, signed, saying `completed`. After the first POST the test waits quiet_seconds
    (two sweeps) for a duplicate that must not come."""
    received = receiver.wait_for(hook, 1, timeout=30)
    assert received, f"no webhook within 30 s; see {deployment.log_dir}"
    time.sleep(quiet_seconds)
    received = receiver.received(hook)
    assert len({delivery.headers["webhook-id"] for delivery in received}) == 1
    assert len(received) == 1
    payload = Webhook(WEBHOOK_SECRET).verify(received[0].body, received[0].headers)
    assert (payload["request_id"], payload["status"]) == (request_id, "completed")
    assert deployment.webhook_events(request_id) == [(received[0].headers["webhook-id"], "delivered", 1)]
