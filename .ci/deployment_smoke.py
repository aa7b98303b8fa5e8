"""The deployment a newcomer meets, end to end: a copy of the checkout, `make install`
only (a fresh venv: no test tools), a .env file holding every setting (the S3
credentials included), then on each broker (RabbitMQ, Redis) the API (`make run`) and
two `make worker` on one host process a small batch into S3 (moto) and send its webhook.

Run from the repository root with the test venv's Python (it has moto and the test
servers): `.venv/bin/python .ci/deployment_smoke.py`. Everything it starts (moto, the
API, the workers, each in a process group of its own) is stopped by its PID; the
database and the broker queues it made are removed. Any failure raises: exit status 1.
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import kombu
import redis
import requests
from amqp.exceptions import NotFound
from standardwebhooks import Webhook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import csv_of  # noqa: E402
from tests.support import images  # noqa: E402
from tests.support.s3_server import TEST_REGION, MotoServer  # noqa: E402
from tests.support.servers import LocalServer, WebhookReceiver  # noqa: E402
from tests.support.service_process import free_port  # noqa: E402

POSTGRES = "postgres@127.0.0.1:5432"
BROKERS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": f"redis://127.0.0.1:6379/{os.environ.get('SMOKE_REDIS_DB', '11')}",
}
IMAGES = 6
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
# Moto accepts any key pair; these reach the processes through .env only.
ACCESS_KEY_ID, SECRET_ACCESS_KEY = "smoke-key", "smoke-secret"
START_SECONDS = 60
BATCH_SECONDS = 60


def say(message: str) -> None:
    print(f"[deployment-smoke] {message}", flush=True)


def copy_checkout(target: Path) -> None:
    """The tracked files as they are in the working tree: what a clone would hold."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def clean_environment() -> dict[str, str]:
    """The process environment without any setting of the service or of boto3, so what
    the processes use comes from .env: as on a fresh machine."""
    names = {line.split("=", 1)[0].lstrip("# ") for line in (ROOT / ".env.example").read_text().splitlines()}
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in names and not name.startswith("AWS_") and name not in {"VIRTUAL_ENV", "PYTHONPATH"}
    }
    env |= {
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    env.pop("ENV_FILE", None)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    return env


class Started:
    """A process group started here (make and what it runs); stopped by its PID."""

    def __init__(self, name: str, command: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.name, self.log = name, log
        with open(log, "ab") as output:
            self.process = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # Whatever of the group outlived make (a worker still shutting down).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


def fail(message: str, *processes: Started) -> None:
    for process in processes:
        say(f"--- last lines of {process.name} ({process.log}):")
        print("\n".join(process.log_text().splitlines()[-40:]), flush=True)
    raise SystemExit(f"[deployment-smoke] FAILED: {message}")


def wait_until(what: str, check, seconds: float, watched: list[Started]):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for process in watched:
            if not process.alive():
                fail(
                    f"{process.name} exited with {process.process.returncode} while waiting for {what}",
                    process,
                )
        result = check()
        if result:
            return result
        time.sleep(0.2)
    fail(f"no {what} within {seconds} s", *watched)


def run_broker(
    broker: str, checkout: Path, base_env: dict[str, str], servers, bucket: str, database: str
) -> None:
    image_server, receiver, moto, s3 = servers
    port = free_port()
    queue = f"smoke-{broker}-{uuid.uuid4().hex[:8]}"
    allowed = f"127.0.0.1:{image_server.port},127.0.0.1:{receiver.port}"
    (checkout / ".env").write_text(
        "\n".join(
            [
                f"HOST=127.0.0.1\nPORT={port}",
                f"DATABASE_URL=postgresql+psycopg2://{POSTGRES}/{database}",
                "TASK_BACKEND=celery",
                f"CELERY_BROKER_URL={BROKERS[broker]}",
                f"CELERY_QUEUE={queue}",
                "STORAGE_BACKEND=s3",
                f"S3_BUCKET={bucket}",
                f"S3_PREFIX={broker}/",
                f"S3_ENDPOINT_URL={moto.endpoint_url}",
                f"AWS_ACCESS_KEY_ID={ACCESS_KEY_ID}",
                f"AWS_SECRET_ACCESS_KEY={SECRET_ACCESS_KEY}",
                f"AWS_DEFAULT_REGION={TEST_REGION}",
                f"ALLOW_PRIVATE_HOSTS={allowed}",
                f"WEBHOOK_ALLOW_PRIVATE_HOSTS={allowed}",
                f"WEBHOOK_SECRET={WEBHOOK_SECRET}",
                "WORKER_CONCURRENCY=4",
                "IMAGE_PROCESSES=1",
                "SHUTDOWN_GRACE_SECONDS=5",
                "",
            ]
        )
    )
    logs = checkout / "smoke-logs"
    logs.mkdir(exist_ok=True)
    make = ["make", "--no-print-directory"]
    api = Started(f"{broker} make run", [*make, "run"], checkout, base_env, logs / f"{broker}-api.log")
    started = [api]
    http = requests.Session()
    http.trust_env = False
    base_url = f"http://127.0.0.1:{port}"
    try:

        def api_ready():
            with contextlib.suppress(requests.RequestException):
                return http.get(f"{base_url}/readyz", timeout=2).status_code == 200
            return False

        # The API applies the migrations; the workers start on the migrated database.
        wait_until(f"{broker}: API ready", api_ready, START_SECONDS, started)
        workers = [
            Started(
                f"{broker} make worker {n}",
                [*make, "worker"],
                checkout,
                base_env,
                logs / f"{broker}-worker{n}.log",
            )
            for n in range(2)
        ]
        started += workers
        for worker in workers:
            wait_until(
                f"{broker}: {worker.name} ready",
                lambda w=worker: " ready." in w.log_text(),
                START_SECONDS,
                started,
            )

        urls = [image_server.add(images.jpeg((64 + n, 48))) for n in range(IMAGES)]
        hook = receiver.new_url()
        csv = csv_of([(n + 1, f"P{n + 1}", [url]) for n, url in enumerate(urls)])
        accepted = http.post(
            f"{base_url}/upload",
            files={"file": ("products.csv", csv, "text/csv")},
            data={"webhook_url": hook},
            timeout=30,
        )
        if accepted.status_code != 202:
            fail(f"{broker}: upload answered {accepted.status_code}: {accepted.text}", *started)
        request_id = accepted.json()["request_id"]

        def finished():
            status = http.get(f"{base_url}/status/{request_id}", timeout=5).json()
            return status if status["status"] not in {"pending", "processing"} else None

        status = wait_until(f"{broker}: batch finished", finished, BATCH_SECONDS, started)
        if status["status"] != "completed":
            fail(f"{broker}: the batch ended {status['status']}: {status}", *started)
        received = wait_until(f"{broker}: webhook", lambda: receiver.received(hook), 30, started)
        payload = Webhook(WEBHOOK_SECRET).verify(received[0].body, received[0].headers)
        if (payload["request_id"], payload["status"]) != (request_id, "completed"):
            fail(f"{broker}: unexpected webhook payload {payload}", *started)
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{broker}/{request_id}/")
        outputs = [
            item["Key"] for item in listed.get("Contents", []) if not item["Key"].endswith("thumb.webp")
        ]
        if len(outputs) < IMAGES:
            fail(f"{broker}: {len(outputs)} outputs in S3, expected {IMAGES}: {outputs}", *started)
        say(f"{broker}: {IMAGES} images completed into S3 by two workers, webhook delivered")
    finally:
        for process in started:
            process.stop()
        delete_queue(broker, queue)


def delete_queue(broker: str, queue: str) -> None:
    with contextlib.suppress(Exception):
        if broker == "redis":
            client = redis.Redis.from_url(BROKERS[broker])
            for key in client.scan_iter(match=f"*{queue}*"):
                client.delete(key)
            return
        with kombu.Connection(BROKERS[broker]) as connection, contextlib.suppress(NotFound):
            connection.default_channel.queue_delete(queue)


def main() -> None:
    began = time.monotonic()
    database = f"image_smoke_{uuid.uuid4().hex[:8]}"
    bucket = f"smoke-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="deployment-smoke-") as temp:
        checkout = Path(temp) / "checkout"
        checkout.mkdir()
        copy_checkout(checkout)
        env = clean_environment()
        say("make install in a copy of the checkout (a fresh venv, runtime dependencies only)")
        installed = subprocess.run(["make", "--no-print-directory", "install"], cwd=checkout, env=env)
        if installed.returncode != 0:
            raise SystemExit("[deployment-smoke] FAILED: make install")
        say(f"installed in {time.monotonic() - began:.0f} s")
        subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", database], check=True)
        try:
            with (
                MotoServer(Path(temp) / "moto.log") as moto,
                LocalServer() as image_server,
                WebhookReceiver() as receiver,
            ):
                s3 = boto3.session.Session().client(
                    "s3",
                    endpoint_url=moto.endpoint_url,
                    region_name=TEST_REGION,
                    aws_access_key_id=ACCESS_KEY_ID,
                    aws_secret_access_key=SECRET_ACCESS_KEY,
                )
                s3.create_bucket(Bucket=bucket)
                for broker in BROKERS:
                    run_broker(broker, checkout, env, (image_server, receiver, moto, s3), bucket, database)
        finally:
            subprocess.run(
                ["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", database], check=False
            )
    say(f"passed in {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
