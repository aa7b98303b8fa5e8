"""`make bench`: the real service as a subprocess against local servers; prints a table and
saves it as JSON under bench-results/.

Figures (medians of BENCH_RUNS runs where it says so):
1. photos: the bare-Pillow ceiling (decode -> q50 encode in a 2-thread pool, in this
   process, with the service's encoder settings: JPEG_QUALITY, JPEG_OPTIMIZE,
   JPEG_PROGRESSIVE) against the same images through the service, upload to finished
   (the first batch after start-up on its own, then the median of the runs); also with
   the stages on threads in the web process (IMAGE_PROCESSES=0), for comparison; and the
   output bytes as a share of the input bytes, for both;
2. tiny images (64x64) through the service, images per second;
3. a 100,000-row CSV (3 URLs a row): time to the 202, then GET /status?limit=100
   latency (p50, p95) while that batch is being processed;
4. the peak RSS of the service and its worker processes over all of it, added up;
5. on PostgreSQL, the in-process runner beside the Celery runner (the API and one
   `make worker` process, RabbitMQ): photos and tiny images, and the cost of the broker
   hop per image.

Environment: BENCH_CORPUS=dir (real images instead of generated ones), BENCH_RUNS (3),
BENCH_PHOTOS (40), BENCH_TINY (3000), BENCH_ROWS (100000), BENCH_DATABASE_URL (a
PostgreSQL URL to run on it instead of a temporary SQLite file; its tables are emptied),
BENCH_CELERY_DATABASE_URL (PostgreSQL for part 5; default the image_bench database on
127.0.0.1, created if missing; "" skips part 5), BENCH_CELERY_BROKER_URL (RabbitMQ on
127.0.0.1).
"""

import csv
import io
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image, ImageFilter

from app.config import PROJECT_ROOT, Settings
from tests.servers import LocalServer, WebhookReceiver
from tests.service_process import ServiceProcess

RESULTS_DIR = PROJECT_ROOT / "bench-results"
# The encoder settings the service runs with (the environment, else the defaults), so
# the ceiling does the same work.
_SETTINGS = Settings(_env_file=None)
JPEG_PARAMS = {
    "quality": _SETTINGS.jpeg_quality,
    "optimize": _SETTINGS.jpeg_optimize,
    "progressive": _SETTINGS.jpeg_progressive,
}
FINISHED = {"completed", "completed_with_errors", "failed"}


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


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


def bare_pillow(data: bytes) -> int:
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG", **JPEG_PARAMS)
    return len(out.getvalue())


def ceiling_seconds(corpus: list[bytes]) -> float:
    return ceiling(corpus)[0]


def ceiling(corpus: list[bytes]) -> tuple[float, float]:
    """Seconds for the corpus, and its output bytes as a share of its input bytes."""
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        output = sum(pool.map(bare_pillow, corpus))
    return time.perf_counter() - start, output / sum(map(len, corpus))


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


def csv_bytes(urls: list[str], per_row: int) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["S. No.", "Product Name", "Input Image Urls"])
    for row, start in enumerate(range(0, len(urls), per_row), start=1):
        writer.writerow([row, f"Product {row}", ",".join(urls[start : start + per_row])])
    return buffer.getvalue().encode()


def run_batch(
    service: ServiceProcess, data: bytes, receiver: WebhookReceiver, timeout: float = 900
) -> tuple[float, dict]:
    """Upload to finished. The end is when the batch's webhook arrives, so no polling
    adds load to the service or rounds the time up."""
    hook = receiver.new_url()
    start = time.monotonic()  # the receiver stamps arrivals with time.monotonic()
    accepted = service.post(
        "/upload", files={"file": ("bench.csv", data, "text/csv")}, data={"webhook_url": hook}
    )
    accepted.raise_for_status()
    request_id = accepted.json()["request_id"]
    (delivery,) = receiver.wait_for(hook, 1, timeout=timeout) or [None]
    if delivery is None:
        raise RuntimeError(f"batch did not finish in {timeout} s")
    return delivery.at - start, service.get(f"/status/{request_id}", params={"limit": 1}).json()


def photo_runs(
    service: ServiceProcess, receiver: WebhookReceiver, corpus: list[bytes], urls: list[str], runs: int
) -> dict:
    """The first batch after start-up is reported on its own (cold caches, new connections);
    the ratio is the median of the `runs` batches after it."""
    first_ceiling = ceiling_seconds(corpus)
    first, body = run_batch(service, csv_bytes(urls, 4), receiver)
    assert body["status"] == "completed", body
    print(f"photos first batch: ceiling {first_ceiling:.2f} s, service {first:.2f} s", flush=True)
    ceilings, services = [], []
    for run in range(runs):
        ceilings.append(ceiling_seconds(corpus))
        elapsed, body = run_batch(service, csv_bytes(urls, 4), receiver)
        assert body["status"] == "completed", body
        services.append(elapsed)
        print(f"photos run {run + 1}: ceiling {ceilings[-1]:.2f} s, service {elapsed:.2f} s", flush=True)
    ceiling_s, through_service = statistics.median(ceilings), statistics.median(services)
    return {
        "ceiling_output_share": round(ceiling(corpus)[1], 4),
        "service_output_share": round(output_share(service, body["request_id"]), 4),
        "encoder": JPEG_PARAMS,
        "ceiling_s": round(ceiling_s, 3),
        "service_s": round(through_service, 3),
        "ratio": round(ceiling_s / through_service, 3),
        "first_batch_ratio": round(first_ceiling / first, 3),
        "runs": {"ceiling_s": ceilings, "service_s": services, "first": [first_ceiling, first]},
    }


def tiny_runs(service: ServiceProcess, receiver: WebhookReceiver, urls: list[str], runs: int) -> dict:
    """Images per second through the service, median of `runs` batches of tiny images."""
    rates = []
    for run in range(runs):
        elapsed, body = run_batch(service, csv_bytes(urls, 3), receiver)
        assert body["status"] == "completed", body
        rates.append(len(urls) / elapsed)
        print(f"tiny run {run + 1}: {rates[-1]:.0f} images/s", flush=True)
    return {"images": len(urls), "per_second": round(statistics.median(rates)), "runs": rates}


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory of the service and its worker processes, added up."""
    total_kb = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total_kb += _peak_kb(int(child))
    return (total_kb + _peak_kb(pid)) / 1024


def _peak_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except FileNotFoundError:  # a process that just ended
        pass
    return 0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


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
        print(f"PostgreSQL at {target.host}:{target.port} does not answer ({exc.__class__.__name__})")
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
        command = [sys.executable, "-m", "celery", "--app", "app.workers.celery_worker", "worker"]
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


def runner_comparison(
    database_url: str,
    broker_url: str,
    service_env: dict,
    work: Path,
    receiver,
    corpus,
    photo_urls,
    tiny_urls,
    runs,
) -> dict:
    """Photos and tiny images through each runner on the same PostgreSQL database."""
    results = {}
    for runner in ("inprocess", "celery"):
        empty_postgres(database_url)
        env = {**service_env, "DATABASE_URL": database_url, "TASK_BACKEND": runner}
        env |= {"CELERY_BROKER_URL": broker_url, "CELERY_QUEUE": f"bench-{os.getpid()}"}
        service = ServiceProcess(env, work / f"{runner}.log").start()
        worker = CeleryWorkerProcess(env, work / "worker.log").start() if runner == "celery" else None
        try:
            print(f"== {runner} runner on PostgreSQL", flush=True)
            photos = photo_runs(service, receiver, corpus, photo_urls, runs)
            tiny = tiny_runs(service, receiver, tiny_urls, runs)
            results[runner] = {
                "photos": photos,
                "tiny_per_second": tiny["per_second"],
                "tiny_runs": tiny["runs"],
            }
        finally:
            if worker is not None:
                worker.stop()
            service.stop()
    inprocess, celery = results["inprocess"], results["celery"]
    results["celery_vs_inprocess"] = {
        "photos": round(inprocess["photos"]["service_s"] / celery["photos"]["service_s"], 3),
        "tiny": round(celery["tiny_per_second"] / inprocess["tiny_per_second"], 3),
        # What the broker adds to each image, from the tiny images' throughput.
        "broker_hop_ms_per_image": round(
            (1000 / celery["tiny_per_second"]) - (1000 / inprocess["tiny_per_second"]), 3
        ),
    }
    return results


def main() -> int:
    runs = env_int("BENCH_RUNS", 3)
    corpus_dir = os.environ.get("BENCH_CORPUS")
    database_url = os.environ.get("BENCH_DATABASE_URL")
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    if database_url:
        empty_postgres(database_url)
    else:
        database_url = f"sqlite:///{work / 'bench.db'}"
    print(f"database: {database_url.split('@')[-1]}; work folder: {work}", flush=True)

    corpus = folder_corpus(corpus_dir) if corpus_dir else generated_corpus(env_int("BENCH_PHOTOS", 40))
    megapixels = (
        sum(Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in corpus) / 1e6
    )
    print(
        f"corpus: {len(corpus)} images, {megapixels:.1f} MP, {sum(map(len, corpus)) / 1e6:.1f} MB", flush=True
    )

    results: dict = {
        "when": datetime.now(UTC).isoformat(),
        "database": "postgresql" if database_url.startswith("postgresql") else "sqlite",
        "cpus": os.cpu_count(),
        "corpus": {
            "images": len(corpus),
            "megapixels": round(megapixels, 1),
            "source": corpus_dir or "generated",
        },
    }
    with LocalServer() as images_server, WebhookReceiver() as receiver:
        photo_urls = [images_server.add(data) for data in corpus]
        tiny = io.BytesIO()
        Image.new("RGB", (64, 64), (90, 140, 200)).save(tiny, "JPEG", quality=90)
        tiny_urls = [images_server.add(tiny.getvalue()) for _ in range(env_int("BENCH_TINY", 3000))]

        service_env = {
            "DATABASE_URL": database_url,
            "MEDIA_ROOT": str(work / "media"),
            "ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{images_server.port}",
            "WEBHOOK_ALLOW_PRIVATE_HOSTS": f"127.0.0.1:{receiver.port}",
        }
        # For comparison: the stages on threads inside the web process.
        threaded_service = ServiceProcess({**service_env, "IMAGE_PROCESSES": "0"}, work / "threads.log")
        try:
            results["photos_threads_in_web_process"] = photo_runs(
                threaded_service.start(), receiver, corpus, photo_urls, runs
            )
            results["photos_threads_in_web_process"]["peak_rss_mb"] = round(
                peak_rss_mb(threaded_service.process.pid), 1
            )
        finally:
            threaded_service.stop()

        service = ServiceProcess(service_env, work / "service.log").start()
        try:
            results["photos"] = photo_runs(service, receiver, corpus, photo_urls, runs)
            results["photos"]["peak_rss_mb"] = round(peak_rss_mb(service.process.pid), 1)

            results["tiny"] = tiny_runs(service, receiver, tiny_urls, runs)

            rows = env_int("BENCH_ROWS", 100_000)
            big = csv_bytes([tiny_urls[n % len(tiny_urls)] + f"?n={n}" for n in range(rows * 3)], 3)
            start = time.perf_counter()
            accepted = service.post("/upload", files={"file": ("big.csv", big, "text/csv")})
            upload_s = time.perf_counter() - start
            accepted.raise_for_status()
            request_id = accepted.json()["request_id"]
            latencies = []
            until = time.perf_counter() + 15
            while time.perf_counter() < until:
                start = time.perf_counter()
                response = service.get(f"/status/{request_id}", params={"limit": 100})
                latencies.append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
                time.sleep(0.05)
            progress = response.json()["progress"]
            results["big_csv"] = {
                "rows": rows,
                "csv_mb": round(len(big) / 1e6, 1),
                "upload_to_202_s": round(upload_s, 3),
                "status_p50_ms": round(percentile(latencies, 0.5), 1),
                "status_p95_ms": round(percentile(latencies, 0.95), 1),
                "status_samples": len(latencies),
                "images_done_while_sampling": progress["processed_images"] + progress["failed_images"],
            }
            print(f"big csv: 202 after {upload_s:.2f} s", flush=True)
            results["peak_rss_mb"] = round(peak_rss_mb(service.process.pid), 1)
        finally:
            service.stop()

        celery_database = os.environ.get(
            "BENCH_CELERY_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/image_bench"
        )
        if celery_database and ensure_postgres_database(celery_database):
            broker = os.environ.get("BENCH_CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
            results["runners"] = runner_comparison(
                celery_database, broker, service_env, work, receiver, corpus, photo_urls, tiny_urls, runs
            )

    print_table(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"bench-{results['database']}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"saved {path}")
    return 0


def print_table(results: dict) -> None:
    photos, tiny, big = results["photos"], results["tiny"], results["big_csv"]
    rows = [
        ("photos: bare Pillow ceiling (2 threads)", f"{photos['ceiling_s']:.2f} s", ""),
        ("photos: through the service", f"{photos['service_s']:.2f} s", ""),
        ("photos: ceiling / service", f"{photos['ratio']:.3f}", ">= 0.95"),
        ("photos: output / input bytes, service", f"{photos['service_output_share']:.1%}", ""),
        ("photos: output / input bytes, bare Pillow", f"{photos['ceiling_output_share']:.1%}", ""),
        ("photos: same, first batch after start-up", f"{photos['first_batch_ratio']:.3f}", ""),
        (
            "photos: ceiling / service, IMAGE_PROCESSES=0",
            f"{results['photos_threads_in_web_process']['ratio']:.3f}",
            "",
        ),
        ("photos: peak RSS, service + workers", f"{photos['peak_rss_mb']:.0f} MB", ""),
        ("tiny 64x64 images through the service", f"{tiny['per_second']} /s", ">= 500 /s"),
        (f"{big['rows']:,}-row CSV upload to 202", f"{big['upload_to_202_s']:.2f} s", "<= 3 s"),
        ("GET /status?limit=100 p50 while it runs", f"{big['status_p50_ms']:.1f} ms", ""),
        ("GET /status?limit=100 p95 while it runs", f"{big['status_p95_ms']:.1f} ms", "<= 50 ms"),
        ("images of that batch done while sampling", f"{big['images_done_while_sampling']:,}", ""),
        ("peak RSS over all, service + workers", f"{results['peak_rss_mb']:.0f} MB", "<= 500 MB"),
    ]
    runners = results.get("runners")
    if runners:
        inprocess, celery, compared = runners["inprocess"], runners["celery"], runners["celery_vs_inprocess"]
        rows += [
            ("PostgreSQL, in-process: photos ceiling/service", f"{inprocess['photos']['ratio']:.3f}", ""),
            ("PostgreSQL, Celery: photos ceiling/service", f"{celery['photos']['ratio']:.3f}", ""),
            ("Celery / in-process, photos", f"{compared['photos']:.3f}", ">= 0.9"),
            ("PostgreSQL, in-process: tiny images", f"{inprocess['tiny_per_second']} /s", ""),
            ("PostgreSQL, Celery: tiny images", f"{celery['tiny_per_second']} /s", ""),
            ("Celery / in-process, tiny images", f"{compared['tiny']:.3f}", ">= 0.9"),
            ("broker hop, per image", f"{compared['broker_hop_ms_per_image']:.3f} ms", ""),
        ]
    print(f"\nresults on {results['database']}, {results['cpus']} CPUs (medians of runs); JPEG {JPEG_PARAMS}")
    print(f"{'figure':<46} {'value':>12}  target")
    for name, value, target in rows:
        print(f"{name:<46} {value:>12}  {target}")


if __name__ == "__main__":
    sys.exit(main())
