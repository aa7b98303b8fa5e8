"""`make bench`: the real service as a subprocess against local servers on 127.0.0.1;
prints a table and saves the results as JSON under bench-results/ (a file per run).

Configurations, in this order, each with a service of its own:
  sqlite/inprocess      a temporary SQLite file, TASK_BACKEND=inprocess
  postgresql/inprocess  BENCH_POSTGRES_URL, TASK_BACKEND=inprocess
  postgresql/celery     BENCH_POSTGRES_URL, TASK_BACKEND=celery: the API and one
                        `make worker` process, RabbitMQ (the service refuses Celery on
                        SQLite)
The PostgreSQL ones run unless --no-postgres is given; their database is created when
missing and its tables are emptied before each. When PostgreSQL does not answer, the
bench says so and goes on with SQLite.

Figures of each configuration; "median (min-max)" is over BENCH_RUNS runs:
1. photos: the bare-Pillow ceiling (decode -> encode with the service's encoder settings,
   JPEG_QUALITY, JPEG_OPTIMIZE and JPEG_PROGRESSIVE, in a pool of 2 processes) against
   the same images through the service, from the upload to the batch's webhook; the
   ratio ceiling / service of each run, median (min-max). The first batch after start-up
   is reported on its own. The output bytes as a share of the input bytes, through the
   service and for the ceiling. On sqlite/inprocess also with the stages on threads in
   the web process (IMAGE_PROCESSES=0), for comparison.
2. tiny images (64x64) through the service: images per second, median (min-max).
3. a big CSV (BENCH_ROWS rows, 3 URLs a row, every URL unique), each run: the upload's
   time to its 202; GET /status/{id}?limit=100 latency, p50 and p95, sampled for
   BENCH_STATUS_SECONDS while the batch is processed; a 10-image batch with a webhook,
   uploaded a few seconds into that window: its upload to webhook time; the big batch's
   images done by the end of the window. Then the big request is cancelled (to status
   "cancelled") and deleted, so the next run starts from a small database; both times
   are recorded (a batch that finished before the cancel, with a small BENCH_ROWS, is
   only deleted). Medians (min-max) over the runs. A small batch not done 60 s after its
   upload, or a request not "cancelled" 120 s after the cancel, fails the configuration.
4. the peak RSS of the service and its worker processes, added up (in-process runners).
   Then a re-import: a catalogue of BENCH_REIMPORT distinct URLs (0.5 MP photos) on an
   origin with ETags and 304s, uploaded twice; the second upload's time (upload to
   webhook) and the bytes the origin sent for it, each as a share of the first's, and
   how many images it reused. Once per configuration.
5. Celery against in-process on PostgreSQL, from the medians: photos (service time),
   tiny images per second, and what the broker adds to each image.
6. input formats, on the compress stage alone (bench/formats.py, once): decode + encode
   of HEIC and AVIF inputs per megapixel beside JPEG, and the output bytes
   COLOR_PROFILE=srgb saves against keep on photographs tagged with installed profiles.
Tiny-image and photo batches ask for new URLs each time (a query string), so every run
measures downloading, decoding and encoding; re-imports are measured apart (4.).
A cell marked with a trailing "✗" misses its target. A configuration that fails is
reported as such and the others go on; the exit status is then 1.

Environment: BENCH_RUNS (3), BENCH_PHOTOS (40), BENCH_CORPUS (a folder of images to use
instead of generated photos), BENCH_TINY (3000), BENCH_ROWS (100000), BENCH_REIMPORT (2000),
BENCH_STATUS_SECONDS (15), BENCH_POSTGRES_URL
(postgresql+psycopg2://postgres@127.0.0.1:5432/image_bench), BENCH_CELERY_BROKER_URL
(amqp://guest:guest@127.0.0.1:5672//).
BENCH_DATABASE_URL and BENCH_CELERY_DATABASE_URL are refused: BENCH_POSTGRES_URL
replaced both. Flags: --no-postgres (`make bench BENCH_ARGS=--no-postgres`) runs SQLite
only; --million (`make bench BENCH_ARGS=--million`) runs only the million-row catalogue
of bench/million.py, which a plain `make bench` never runs.
"""

import argparse
import csv
import io
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageFilter

from app.config import PROJECT_ROOT, Settings
from tests.support.servers import LocalServer, RevalidatingSource, WebhookReceiver
from tests.support.service_process import ServiceProcess

RESULTS_DIR = PROJECT_ROOT / "bench-results"
# The encoder settings the service runs with (the environment, else the defaults), so
# the ceiling does the same work.
_SETTINGS = Settings(_env_file=None)
JPEG_PARAMS = {
    "quality": _SETTINGS.jpeg_quality,
    "optimize": _SETTINGS.jpeg_optimize,
    "progressive": _SETTINGS.jpeg_progressive,
}
FINISHED = {"completed", "completed_with_errors", "failed", "cancelled"}
DEFAULT_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/image_bench"
DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
RENAMED_ENV = ("BENCH_DATABASE_URL", "BENCH_CELERY_DATABASE_URL")

CEILING_PROCESSES = 2
SMALL_BATCH_IMAGES = 10
SMALL_BATCH_AFTER_S = 3.0  # into the status window; at most a third of it
SMALL_BATCH_TIMEOUT_S = 60.0
CANCEL_TIMEOUT_S = 120.0
STATUS_INTERVAL_S = 0.05


def say(message: str) -> None:
    print(message, flush=True)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Params:
    runs: int
    photos: int
    tiny: int
    rows: int
    status_seconds: float
    corpus_dir: str | None
    reimport: int = 2000

    @classmethod
    def from_env(cls) -> "Params":
        return cls(
            runs=env_int("BENCH_RUNS", 3),
            photos=env_int("BENCH_PHOTOS", 40),
            tiny=env_int("BENCH_TINY", 3000),
            rows=env_int("BENCH_ROWS", 100_000),
            status_seconds=float(os.environ.get("BENCH_STATUS_SECONDS", 15)),
            corpus_dir=os.environ.get("BENCH_CORPUS") or None,
            reimport=env_int("BENCH_REIMPORT", 2000),
        )


# -- the corpus and the ceiling ---------------------------------------------------------


def photo(rng: random.Random, megapixels: float) -> Image.Image:
    """Smooth shapes plus fine noise: decodes and encodes like a photograph."""
    width = int((megapixels * 1_000_000 * 4 / 3) ** 0.5)
    height = int(width * 3 / 4)
    base = Image.radial_gradient("L").resize((width, height))
    channels = [base.rotate(rng.randint(0, 359)).resize((width, height)) for _ in range(3)]
    image = Image.merge("RGB", channels)
    noise = Image.effect_noise((width, height), rng.uniform(20, 40)).convert("RGB")
    return Image.blend(image, noise.filter(ImageFilter.GaussianBlur(1)), 0.3)


def generated_corpus(count: int) -> list[bytes]:
    rng = random.Random(7)
    corpus = []
    for n in range(count):
        image = photo(rng, rng.uniform(1.0, 3.0))
        buffer = io.BytesIO()
        kind = ("JPEG", "PNG", "WEBP")[n % 3]
        image.save(buffer, kind, **({"quality": 90} if kind != "PNG" else {}))
        corpus.append(buffer.getvalue())
    return corpus


def folder_corpus(folder: str) -> list[bytes]:
    return [path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()]


def megapixels(corpus: list[bytes]) -> float:
    return sum(width * height for width, height in (Image.open(io.BytesIO(d)).size for d in corpus)) / 1e6


def bare_pillow(data: bytes) -> int:
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", **JPEG_PARAMS)
    return len(out.getvalue())


_pool_corpus: list[bytes] = []


def _keep_corpus(corpus: list[bytes]) -> None:
    global _pool_corpus
    _pool_corpus = corpus


def _encode_nth(n: int) -> int:
    return bare_pillow(_pool_corpus[n])


class CeilingPool:
    """The bare-Pillow ceiling: the corpus decoded and encoded by a pool of processes, as a
    plain script would do it with no GIL shared between its workers. The processes get the
    corpus once, when they start, and send back only output sizes."""

    def __init__(self, corpus: list[bytes]):
        self.count = len(corpus)
        self.input_bytes = sum(map(len, corpus))
        self.pool = ProcessPoolExecutor(CEILING_PROCESSES, initializer=_keep_corpus, initargs=(corpus,))

    def __enter__(self) -> "CeilingPool":
        self.run()  # starts the processes and warms them up; not timed
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown(cancel_futures=True)

    def run(self) -> tuple[float, float]:
        """Seconds for the corpus, and its output bytes as a share of its input bytes."""
        start = time.perf_counter()
        output = sum(self.pool.map(_encode_nth, range(self.count)))
        return time.perf_counter() - start, output / self.input_bytes


# -- what every configuration shares ------------------------------------------------------


@dataclass
class Bench:
    params: Params
    work: Path
    photo_urls: list[str]
    tiny_urls: list[str]
    images_server: LocalServer
    receiver: WebhookReceiver
    ceiling: CeilingPool
    broker_url: str


@dataclass(frozen=True)
class Configuration:
    database: str  # "sqlite" or "postgresql"
    runner: str  # TASK_BACKEND: "inprocess" or "celery"
    database_url: str

    @property
    def name(self) -> str:
        return f"{self.database}/{self.runner}"

    @property
    def slug(self) -> str:
        return f"{self.database}-{self.runner}"


def service_env(bench: Bench, config: Configuration) -> dict[str, str]:
    return {
        "DATABASE_URL": config.database_url,
        "TASK_BACKEND": config.runner,
        "MEDIA_ROOT": str(bench.work / config.slug / "media"),
        "IMPORT_DIR": str(bench.work / config.slug / "imports"),
        "ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{bench.images_server.port}",
        "WEBHOOK_ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{bench.receiver.port}",
        "CELERY_BROKER_URL": bench.broker_url,
        "CELERY_QUEUE": f"bench-{os.getpid()}",
        # Every image comes from one local origin: measure the service's own ceiling, not
        # the politeness a CDN gets (8 in flight by default; docs/fetching.md).
        "FETCH_PER_HOST_CONCURRENCY": "64",
    }


def spread(values: list[float | None], digits: int = 3) -> dict | None:
    """Median, min and max of the runs' values (None when no run had one)."""
    present = [value for value in values if value is not None]
    if not present:
        return None

    def rounded(value: float) -> float:
        return round(value, digits) if digits else round(value)  # 0 digits: an int

    return {
        "median": rounded(statistics.median(present)),
        "min": rounded(min(present)),
        "max": rounded(max(present)),
        "runs": [None if value is None else rounded(value) for value in values],
    }


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def csv_bytes(urls: list[str], per_row: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for row, start in enumerate(range(0, len(urls), per_row), start=1):
        writer.writerow([row, f"Product {row}", ",".join(urls[start : start + per_row])])
    return buffer.getvalue().encode()


def upload(service: ServiceProcess, data: bytes, webhook_url: str | None = None) -> str:
    """POST /upload; the request id of the 202."""
    form = {"webhook_url": webhook_url} if webhook_url else {}
    accepted = service.post("/upload", files={"file": ("bench.csv", data, "text/csv")}, data=form)
    accepted.raise_for_status()
    return accepted.json()["request_id"]


def status(service: ServiceProcess, request_id: str, limit: int = 1) -> dict:
    response = service.get(f"/status/{request_id}", params={"limit": limit})
    response.raise_for_status()
    return response.json()


def run_batch(
    service: ServiceProcess, data: bytes, receiver: WebhookReceiver, timeout: float = 900
) -> tuple[float, dict]:
    """Upload to finished. The end is when the batch's webhook arrives, so no polling
    adds load to the service or rounds the time up."""
    hook = receiver.new_url()
    start = time.monotonic()  # the receiver stamps arrivals with time.monotonic()
    request_id = upload(service, data, hook)
    (delivery,) = receiver.wait_for(hook, 1, timeout=timeout) or [None]
    if delivery is None:
        raise RuntimeError(f"batch did not finish in {timeout} s")
    return delivery.at - start, status(service, request_id)


# -- 1. photos ------------------------------------------------------------------------------


def output_share(service: ServiceProcess, request_id: str) -> float:
    """A finished batch's output bytes as a share of its input bytes."""
    input_bytes = output_bytes = 0
    cursor = None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        body = service.get(f"/status/{request_id}", params=params).json()
        for product in body["products"]:
            for image in product["images"]:
                input_bytes += image["input_bytes"] or 0
                output_bytes += image["output_bytes"] or 0
        cursor = body["next_cursor"]
        if not cursor:
            return output_bytes / input_bytes


_photo_batches = itertools.count()


def photo_batch(service: ServiceProcess, bench: Bench) -> tuple[float, str]:
    # New URLs for each batch: the same bytes again would be a re-import (the earlier
    # output copied, nothing decoded), which reimport_figures measures.
    batch = next(_photo_batches)
    urls = [f"{url}?photos={batch}" for url in bench.photo_urls]
    elapsed, body = run_batch(service, csv_bytes(urls, 4), bench.receiver)
    assert body["status"] == "completed", body
    return elapsed, body["request_id"]


def photo_runs(service: ServiceProcess, bench: Bench) -> dict:
    """The first batch after start-up is reported on its own (cold caches, new connections);
    the figures are over the `runs` batches after it, each paired with a ceiling measured
    just before it."""
    first_ceiling, ceiling_share = bench.ceiling.run()
    first, _ = photo_batch(service, bench)
    say(f"photos first batch: ceiling {first_ceiling:.2f} s, service {first:.2f} s")
    ceilings, services = [], []
    for run in range(bench.params.runs):
        ceilings.append(bench.ceiling.run()[0])
        elapsed, request_id = photo_batch(service, bench)
        services.append(elapsed)
        say(f"photos run {run + 1}: ceiling {ceilings[-1]:.2f} s, service {elapsed:.2f} s")
    return {
        "ceiling_s": spread(ceilings),
        "service_s": spread(services),
        "ratio": spread([ceiling / service for ceiling, service in zip(ceilings, services, strict=True)]),
        "first_batch": {
            "ceiling_s": round(first_ceiling, 3),
            "service_s": round(first, 3),
            "ratio": round(first_ceiling / first, 3),
        },
        "ceiling_output_share": round(ceiling_share, 4),
        "service_output_share": round(output_share(service, request_id), 4),
    }


# -- 2. tiny images --------------------------------------------------------------------------


def tiny_runs(service: ServiceProcess, bench: Bench) -> dict:
    """Images per second through the service, over `runs` batches of tiny images."""
    rates = []
    for run in range(bench.params.runs):
        # New URLs each run: the same ones again would be a re-import (revalidated and
        # copied, not downloaded and encoded), which reimport_figures measures.
        urls = [f"{url}?tiny={run}" for url in bench.tiny_urls]
        elapsed, body = run_batch(service, csv_bytes(urls, 3), bench.receiver)
        assert body["status"] == "completed", body
        rates.append(len(bench.tiny_urls) / elapsed)
        say(f"tiny run {run + 1}: {rates[-1]:.0f} images/s")
    return {"images": len(bench.tiny_urls), "per_second": spread(rates, 0)}


# -- re-imports ------------------------------------------------------------------------------

REIMPORT_VARIANTS = 16  # distinct photos behind the catalogue's URLs


def reimport_sources(images_server: LocalServer, count: int) -> tuple[list[RevalidatingSource], list[str]]:
    """`count` new URLs on an origin that answers conditional requests, each with an
    ETag and Last-Modified of its own, serving 0.5 MP photos."""
    rng = random.Random(11)
    variants = []
    for _ in range(REIMPORT_VARIANTS):
        buffer = io.BytesIO()
        photo(rng, 0.5).save(buffer, "JPEG", quality=90)
        variants.append(buffer.getvalue())
    sources = [RevalidatingSource(variants[n % REIMPORT_VARIANTS], etag=f'"v1-{n}"') for n in range(count)]
    return sources, [images_server.add_handler(source.handler, ".jpg") for source in sources]


def bytes_sent(sources: list[RevalidatingSource]) -> int:
    """What the origin has sent in 200 answers' bodies so far."""
    return sum(len(source.body) * source.statuses.count(200) for source in sources)


def reimport_figures(service: ServiceProcess, bench: Bench) -> dict:
    """The same catalogue uploaded twice, nothing changed at the origin."""
    sources, urls = reimport_sources(bench.images_server, bench.params.reimport)
    catalogue = csv_bytes(urls, 4)
    first_s, first = run_batch(service, catalogue, bench.receiver)
    first_bytes = bytes_sent(sources)
    second_s, second = run_batch(service, catalogue, bench.receiver)
    second_bytes = bytes_sent(sources) - first_bytes
    assert first["status"] == second["status"] == "completed", (first, second)
    say(
        f"re-import of {len(urls)} images: {first_s:.2f} s then {second_s:.2f} s; "
        f"{first_bytes / 1e6:.1f} MB then {second_bytes / 1e6:.2f} MB downloaded"
    )
    return {
        "images": len(urls),
        "first_s": round(first_s, 3),
        "second_s": round(second_s, 3),
        "time_share": round(second_s / first_s, 4),
        "bytes_share": round(second_bytes / first_bytes, 4),
        "reused": second["progress"]["reused_images"],
    }


# -- 3. a big CSV ----------------------------------------------------------------------------


@dataclass
class SmallBatch:
    hook: str
    uploaded_at: float  # time.monotonic(), as the receiver stamps arrivals


def upload_small_batch(service: ServiceProcess, bench: Bench, run: int) -> SmallBatch:
    tiny = bench.tiny_urls
    urls = [f"{tiny[n % len(tiny)]}?small={run}-{n}" for n in range(SMALL_BATCH_IMAGES)]
    hook = bench.receiver.new_url()
    uploaded_at = time.monotonic()
    upload(service, csv_bytes(urls, 1), hook)
    return SmallBatch(hook, uploaded_at)


def small_batch_seconds(receiver: WebhookReceiver, batch: SmallBatch) -> float:
    remaining = batch.uploaded_at + SMALL_BATCH_TIMEOUT_S - time.monotonic()
    (delivery,) = receiver.wait_for(batch.hook, 1, timeout=max(0, remaining)) or [None]
    if delivery is None:
        raise RuntimeError(f"the small batch behind the big one did not finish in {SMALL_BATCH_TIMEOUT_S} s")
    return delivery.at - batch.uploaded_at


def sample_status(service: ServiceProcess, bench: Bench, request_id: str, run: int) -> dict:
    """GET /status?limit=100 latencies over the window, with the small batch uploaded a few
    seconds into it."""
    window = bench.params.status_seconds
    small_after = min(SMALL_BATCH_AFTER_S, window / 3)
    latencies: list[float] = []
    small = None
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < window:
        if small is None and elapsed >= small_after:
            small = upload_small_batch(service, bench, run)
        start = time.perf_counter()
        body = status(service, request_id, limit=100)
        latencies.append((time.perf_counter() - start) * 1000)
        time.sleep(STATUS_INTERVAL_S)
    if small is None:  # a window too short to reach it
        small = upload_small_batch(service, bench, run)
    progress = body["progress"]
    return {
        "status_p50_ms": percentile(latencies, 0.5),
        "status_p95_ms": percentile(latencies, 0.95),
        "status_samples": len(latencies),
        "images_done_while_sampling": progress["processed_images"] + progress["failed_images"],
        "small_batch_s": small_batch_seconds(bench.receiver, small),
    }


def cancel_and_delete(service: ServiceProcess, request_id: str) -> dict:
    """Cancel the request and wait for "cancelled", then DELETE it. A request that finished
    before the cancel (a small BENCH_ROWS) is only deleted."""
    start = time.perf_counter()
    response = service.post(f"/requests/{request_id}/cancel")
    cancel_answer_s = time.perf_counter() - start
    finished_before = response.status_code == 409 and status(service, request_id)["status"] in FINISHED
    if not finished_before:
        if response.status_code != 202:
            raise RuntimeError(f"cancel answered {response.status_code}: {response.text[:300]}")
        state = response.json()["status"]
        while state != "cancelled":
            if time.perf_counter() - start > CANCEL_TIMEOUT_S:
                raise RuntimeError(
                    f"request {request_id} not cancelled {CANCEL_TIMEOUT_S} s after the cancel"
                )
            time.sleep(STATUS_INTERVAL_S)
            state = status(service, request_id)["status"]
    cancelled_s = time.perf_counter() - start

    delete_answer_s, delete_s = delete_and_wait(service, request_id, CANCEL_TIMEOUT_S)
    return {
        "finished_before_cancel": finished_before,
        "cancel_answer_s": None if finished_before else cancel_answer_s,
        "cancel_to_cancelled_s": None if finished_before else cancelled_s,
        "delete_answer_s": delete_answer_s,
        "delete_s": delete_s,
    }


def delete_and_wait(service: ServiceProcess, request_id: str, timeout_s: float) -> tuple[float, float]:
    """DELETE the request; the seconds to its answer and until its status answers 404. A
    large request's DELETE answers 202 ("deleting") and goes on in the background."""
    start = time.perf_counter()
    response = service.http.delete(f"{service.base_url}/requests/{request_id}", timeout=timeout_s)
    answer_s = time.perf_counter() - start
    if response.status_code not in (202, 204):
        raise RuntimeError(f"DELETE answered {response.status_code}: {response.text[:300]}")
    while response.status_code != 404:
        if time.perf_counter() - start > timeout_s:
            raise RuntimeError(f"request {request_id} not gone {timeout_s} s after its DELETE")
        time.sleep(STATUS_INTERVAL_S)
        response = service.get(f"/status/{request_id}?limit=1")
    return answer_s, time.perf_counter() - start


def big_csv_run(service: ServiceProcess, bench: Bench, run: int) -> dict:
    tiny = bench.tiny_urls
    urls = [f"{tiny[n % len(tiny)]}?big={run}-{n}" for n in range(bench.params.rows * 3)]
    data = csv_bytes(urls, 3)
    start = time.perf_counter()
    request_id = upload(service, data)
    figures = {"csv_mb": len(data) / 1e6, "upload_to_202_s": time.perf_counter() - start}
    figures |= sample_status(service, bench, request_id, run)
    figures |= cancel_and_delete(service, request_id)
    cancelled = (
        "it had finished before the cancel"
        if figures["finished_before_cancel"]
        else f"cancelled after {figures['cancel_to_cancelled_s']:.2f} s"
    )
    say(
        f"big csv run {run + 1}: 202 after {figures['upload_to_202_s']:.2f} s, status p50 "
        f"{figures['status_p50_ms']:.1f} / p95 {figures['status_p95_ms']:.1f} ms, small batch "
        f"{figures['small_batch_s']:.2f} s, {figures['images_done_while_sampling']:,} images done; "
        f"{cancelled}, deleted in {figures['delete_s']:.2f} s"
    )
    return figures


def big_csv_runs(service: ServiceProcess, bench: Bench) -> dict:
    runs = [big_csv_run(service, bench, run) for run in range(bench.params.runs)]

    def over_runs(key: str, digits: int) -> dict | None:
        return spread([run[key] for run in runs], digits)

    return {
        "rows": bench.params.rows,
        "csv_mb": round(runs[0]["csv_mb"], 1),
        "upload_to_202_s": over_runs("upload_to_202_s", 3),
        "status_p50_ms": over_runs("status_p50_ms", 1),
        "status_p95_ms": over_runs("status_p95_ms", 1),
        "small_batch_s": over_runs("small_batch_s", 3),
        "images_done_while_sampling": over_runs("images_done_while_sampling", 0),
        "cancel_answer_s": over_runs("cancel_answer_s", 3),
        "cancel_to_cancelled_s": over_runs("cancel_to_cancelled_s", 3),
        "delete_answer_s": over_runs("delete_answer_s", 3),
        "delete_s": over_runs("delete_s", 3),
        "status_samples": [run["status_samples"] for run in runs],
        "finished_before_cancel": [run["finished_before_cancel"] for run in runs],
    }


# -- 4. memory -------------------------------------------------------------------------------


def child_pids(pid: int) -> list[int]:
    """The process's children (its image worker processes), from every thread's list."""
    return [
        int(child)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the service and its worker processes, added up."""
    return (sum(_peak_kb(child) for child in child_pids(pid)) + _peak_kb(pid)) / 1024


def _peak_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except FileNotFoundError:  # a process that just ended
        pass
    return 0


# -- the databases and the processes ---------------------------------------------------------


def fresh_schema(url: str) -> None:
    """The service's schema from scratch on the database at `url`: every table dropped
    (unless SQLite: a new file), then Alembic's migrations, in a process of their own. A
    schema from another checkout's migrations is dropped too, not upgraded."""
    from sqlalchemy import MetaData, create_engine

    if not url.startswith("sqlite"):
        engine = create_engine(url)
        metadata = MetaData()
        metadata.reflect(engine)
        metadata.drop_all(engine)
        engine.dispose()
    migrate = [sys.executable, "-m", "alembic", "upgrade", "head"]
    subprocess.run(migrate, env={**os.environ, "DATABASE_URL": url}, check=True, capture_output=True)


def empty_postgres(url: str) -> None:
    from sqlalchemy import text

    from app.db.base import Base
    from app.db.migrate import upgrade_to_head
    from app.db.session import build_engine

    upgrade_to_head(url)
    engine = build_engine(url)
    with engine.begin() as connection:
        names = ", ".join(table.name for table in Base.metadata.sorted_tables)
        connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


def ensure_postgres_database(url: str) -> bool:
    """Create the URL's database if it is missing; False when PostgreSQL does not answer."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    target = make_url(url)
    try:
        admin = create_engine(target.set(database="postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            exists = connection.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": target.database}
            )
            if not exists:
                connection.execute(text(f'CREATE DATABASE "{target.database}"'))
        admin.dispose()
    except Exception as exc:
        reason = exc.__class__.__name__
        say(f"PostgreSQL at {target.host}:{target.port} does not answer ({reason}): SQLite only")
        return False
    return True


class CeleryWorkerProcess:
    """One `make worker` process, as a deployment runs it."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "CeleryWorkerProcess":
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        command = [sys.executable, "-m", "celery", "--app", "app.runners.celery_worker", "worker"]
        command += ["--loglevel", "INFO", "--without-gossip", "--without-mingle"]
        self.process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while b" ready." not in self.log_path.read_bytes():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Celery worker did not start; see {self.log_path}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def delete_broker_queue(broker_url: str, queue: str) -> None:
    """The run's own Celery queue, so runs leave none behind on the broker."""
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=5) as connection:
            connection.connect()
            connection.channel().queue_delete(queue)
    except Exception as exc:
        say(f"could not delete the queue {queue} on the broker ({exc.__class__.__name__})")


@contextmanager
def running_service(env: dict[str, str], logs: Path) -> Iterator[ServiceProcess]:
    """The service, and for TASK_BACKEND=celery one worker beside it; both stopped however
    the block ends."""
    logs.mkdir(parents=True, exist_ok=True)
    service = ServiceProcess(env, logs / "service.log")
    worker = CeleryWorkerProcess(env, logs / "worker.log") if env["TASK_BACKEND"] == "celery" else None
    try:
        service.start()
        if worker is not None:
            worker.start()
        yield service
    finally:
        if worker is not None:
            worker.stop()
        service.stop()
        if worker is not None:
            delete_broker_queue(env["CELERY_BROKER_URL"], env["CELERY_QUEUE"])


# -- a configuration, and the whole bench ----------------------------------------------------


def run_configuration(bench: Bench, config: Configuration) -> dict:
    say(f"== {config.name}")
    if config.database == "postgresql":
        empty_postgres(config.database_url)
    env = service_env(bench, config)
    results: dict = {}
    if config.name == "sqlite/inprocess":
        say("photos with IMAGE_PROCESSES=0 (stages on threads in the web process)")
        with running_service({**env, "IMAGE_PROCESSES": "0"}, bench.work / "threads") as service:
            results["photos_image_processes_0"] = photo_runs(service, bench)
            results["photos_image_processes_0"]["peak_rss_mb"] = round(peak_rss_mb(service.process.pid), 1)
    with running_service(env, bench.work / config.slug) as service:
        results["photos"] = photo_runs(service, bench)
        results["tiny"] = tiny_runs(service, bench)
        results["big_csv"] = big_csv_runs(service, bench)
        if config.runner == "inprocess":
            results["peak_rss_mb"] = round(peak_rss_mb(service.process.pid), 1)
        results["reimport"] = reimport_figures(service, bench)
    return results


def celery_vs_inprocess(inprocess: dict, celery: dict) -> dict:
    """From the medians: service time for photos, images per second for tiny ones."""
    inprocess_tiny = inprocess["tiny"]["per_second"]["median"]
    celery_tiny = celery["tiny"]["per_second"]["median"]
    return {
        "photos": round(
            inprocess["photos"]["service_s"]["median"] / celery["photos"]["service_s"]["median"], 3
        ),
        "tiny": round(celery_tiny / inprocess_tiny, 3),
        # What the broker adds to each image, from the tiny images' throughput.
        "broker_hop_ms_per_image": round(1000 / celery_tiny - 1000 / inprocess_tiny, 3),
    }


def configurations(work: Path, no_postgres: bool) -> list[Configuration]:
    chosen = [Configuration("sqlite", "inprocess", f"sqlite:///{work / 'bench.db'}")]
    postgres_url = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    if no_postgres:
        say("PostgreSQL: skipped (--no-postgres)")
    elif ensure_postgres_database(postgres_url):
        say(f"PostgreSQL: {postgres_url.split('@')[-1]} (its tables are emptied)")
        chosen += [
            Configuration("postgresql", "inprocess", postgres_url),
            Configuration("postgresql", "celery", postgres_url),
        ]
    return chosen


def _stop_on_sigterm(signum, frame) -> None:
    # SystemExit runs the finally blocks that stop the services and the worker.
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Benchmark the service.")
    parser.add_argument("--no-postgres", action="store_true", help="run on SQLite only")
    parser.add_argument(
        "--million",
        action="store_true",
        help="only the million-row catalogue on PostgreSQL (bench/million.py); minutes, GBs of disk",
    )
    args = parser.parse_args(argv)
    for name in RENAMED_ENV:
        if name in os.environ:
            parser.error(f"{name} is now BENCH_POSTGRES_URL")
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    params = Params.from_env()
    if args.million:
        from bench.million import run

        return run(params)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    say(f"work folder (logs, SQLite file, outputs): {work}")

    corpus = folder_corpus(params.corpus_dir) if params.corpus_dir else generated_corpus(params.photos)
    corpus_mp = megapixels(corpus)
    say(f"corpus: {len(corpus)} images, {corpus_mp:.1f} MP, {sum(map(len, corpus)) / 1e6:.1f} MB")
    chosen = configurations(work, args.no_postgres)
    results: dict = {
        "when": datetime.now(UTC).isoformat(),
        "cpus": os.cpu_count(),
        "parameters": asdict(params),
        "corpus": {
            "images": len(corpus),
            "megapixels": round(corpus_mp, 1),
            "source": params.corpus_dir or "generated",
        },
        "encoder": JPEG_PARAMS,
        "ceiling": f"bare Pillow, a pool of {CEILING_PROCESSES} processes",
        "configurations": {},
    }
    failed = []
    # The ceiling's processes are forked before the servers' threads start.
    with CeilingPool(corpus) as ceiling, LocalServer() as images_server, WebhookReceiver() as receiver:
        tiny = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 140, 200)).save(tiny, "JPEG", quality=90)
        bench = Bench(
            params=params,
            work=work,
            photo_urls=[images_server.add(data) for data in corpus],
            tiny_urls=[images_server.add(tiny.getvalue()) for _ in range(params.tiny)],
            images_server=images_server,
            receiver=receiver,
            ceiling=ceiling,
            broker_url=os.environ.get("BENCH_CELERY_BROKER_URL", DEFAULT_BROKER_URL),
        )
        for config in chosen:
            try:
                results["configurations"][config.name] = run_configuration(bench, config)
            except Exception:
                traceback.print_exc()
                say(f"{config.name} failed; see the logs in {work}")
                failed.append(config.name)
                results["configurations"][config.name] = {"error": traceback.format_exc()}

    done = results["configurations"]
    if all(
        name in done and "error" not in done[name] for name in ("postgresql/inprocess", "postgresql/celery")
    ):
        results["celery_vs_inprocess"] = celery_vs_inprocess(
            done["postgresql/inprocess"], done["postgresql/celery"]
        )
    say("== input formats and colour profiles (the compress stage alone)")
    from bench.formats import measure

    results["formats"] = measure()
    results["bench_seconds"] = round(time.monotonic() - began)
    print_table(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    say(f"saved {path} ({results['bench_seconds']} s)")
    return 1 if failed else 0


# -- the table -------------------------------------------------------------------------------

COLUMNS = ("sqlite/inprocess", "postgresql/inprocess", "postgresql/celery")


@dataclass(frozen=True)
class Target:
    text: str
    at_least: float | None = None
    at_most: float | None = None

    def missed(self, value: float) -> bool:
        return (self.at_least is not None and value < self.at_least) or (
            self.at_most is not None and value > self.at_most
        )


@dataclass(frozen=True)
class Figure:
    label: str
    value: Callable[[dict], object]  # from a configuration's results: a spread, a number or None
    form: str  # format spec of the numbers
    target: Target | None = None


FIGURES = [
    Figure("photos: bare Pillow ceiling (2 processes), s", lambda c: c["photos"]["ceiling_s"], ".2f"),
    Figure("photos: through the service, s", lambda c: c["photos"]["service_s"], ".2f"),
    Figure(
        "photos: ceiling / service",
        lambda c: c["photos"]["ratio"],
        ".3f",
        Target(">= 1.0", at_least=1.0),
    ),
    Figure("photos: same, first batch after start-up", lambda c: c["photos"]["first_batch"]["ratio"], ".3f"),
    Figure("photos: output / input bytes, service", lambda c: c["photos"]["service_output_share"], ".1%"),
    Figure("photos: output / input bytes, bare Pillow", lambda c: c["photos"]["ceiling_output_share"], ".1%"),
    Figure(
        "photos: ceiling / service, IMAGE_PROCESSES=0",
        lambda c: c.get("photos_image_processes_0", {}).get("ratio"),
        ".3f",
    ),
    Figure(
        "tiny 64x64 images per second",
        lambda c: c["tiny"]["per_second"],
        ".0f",
        Target(">= 500", at_least=500),
    ),
    Figure(
        "big CSV: upload to 202, s",
        lambda c: c["big_csv"]["upload_to_202_s"],
        ".2f",
        Target("<= 3 s", at_most=3),
    ),
    Figure("big CSV: GET /status?limit=100 p50, ms", lambda c: c["big_csv"]["status_p50_ms"], ".1f"),
    Figure(
        "big CSV: GET /status?limit=100 p95, ms",
        lambda c: c["big_csv"]["status_p95_ms"],
        ".1f",
        Target("<= 50 ms", at_most=50),
    ),
    Figure(
        "a 10-image batch behind it, upload to webhook, s",
        lambda c: c["big_csv"]["small_batch_s"],
        ".2f",
        Target("<= 2 s", at_most=2),
    ),
    Figure(
        "big CSV: its images done while sampling",
        lambda c: c["big_csv"]["images_done_while_sampling"],
        ",.0f",
    ),
    Figure("big CSV: cancel's answer, s", lambda c: c["big_csv"].get("cancel_answer_s"), ".2f"),
    Figure("big CSV: cancel to status cancelled, s", lambda c: c["big_csv"]["cancel_to_cancelled_s"], ".2f"),
    Figure("big CSV: DELETE's answer, s", lambda c: c["big_csv"].get("delete_answer_s"), ".2f"),
    Figure("big CSV: DELETE of the cancelled request, to 404, s", lambda c: c["big_csv"]["delete_s"], ".2f"),
    Figure(
        "peak RSS, service + workers, MB",
        lambda c: c.get("peak_rss_mb"),
        ".0f",
        Target("<= 500 MB", at_most=500),
    ),
    Figure(
        "re-import, nothing changed: time / first import's",
        lambda c: c.get("reimport", {}).get("time_share"),
        ".1%",
        Target("<= 20%", at_most=0.20),
    ),
    Figure(
        "re-import: bytes downloaded / first import's",
        lambda c: c.get("reimport", {}).get("bytes_share"),
        ".1%",
        Target("<= 5%", at_most=0.05),
    ),
]

COMPARISONS = [
    ("Celery / in-process, photos", "photos", ".3f", Target(">= 0.9", at_least=0.9)),
    ("Celery / in-process, tiny images", "tiny", ".3f", Target(">= 0.9", at_least=0.9)),
    ("broker hop per tiny image, ms", "broker_hop_ms_per_image", ".3f", None),
]


def cell(value: object, form: str, target: Target | None) -> str:
    """A spread as "median (min-max)", a number alone; a trailing "✗" when it misses."""
    if value is None:
        return "—"
    if isinstance(value, dict):
        text = f"{value['median']:{form}} ({value['min']:{form}}–{value['max']:{form}})"
        value = value["median"]
    else:
        text = f"{value:{form}}"
    return text + (" ✗" if target is not None and target.missed(value) else "")


def figure_cells(figure: Figure, configurations: dict) -> list[str]:
    cells = []
    for name in COLUMNS:
        results = configurations.get(name)
        if results is None:
            cells.append("not run")
        elif "error" in results:
            cells.append("failed")
        else:
            cells.append(cell(figure.value(results), figure.form, figure.target))
    return cells


def print_table(results: dict) -> None:
    rows = [("figure", list(COLUMNS), "target")]
    for figure in FIGURES:
        cells = figure_cells(figure, results["configurations"])
        rows.append((figure.label, cells, figure.target.text if figure.target else ""))
    compared = results.get("celery_vs_inprocess")
    for label, key, form, target in COMPARISONS:
        value = cell(compared[key], form, target) if compared else "—"
        rows.append((label, ["", "", value], target.text if target else ""))
    runs = results["parameters"]["runs"]
    say(f"\nmedian (min–max) of {runs} runs, {results['cpus']} CPUs, JPEG {results['encoder']}")
    say("✗: misses the target")
    label_width = max(len(label) for label, _, _ in rows)
    widths = [max(len(cells[n]) for _, cells, _ in rows) for n in range(len(COLUMNS))]
    for label, cells, target in rows:
        columns = [f"{text:>{width}}" for text, width in zip(cells, widths, strict=True)]
        say("  ".join([f"{label:<{label_width}}", *columns, target]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
