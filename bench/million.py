"""`make bench BENCH_ARGS=--million`: one catalogue of a million products against the
real service on PostgreSQL, with the in-process runner and then with Celery (one worker;
BENCH_MILLION_RUNNERS, default "inprocess,celery"), run only when asked (never in CI,
never in a plain `make bench`): it takes minutes and a few GB of disk.

For each size of BENCH_MILLION_ROWS (default "100000,1000000"; 3 URLs a row, every URL
unique, generated into the work folder and sent from the file):
- the upload's time to its 202, and the web process's peak memory growth during it: its
  peak (VmHWM) is reset (/proc/PID/clear_refs) before the upload and read after the 202,
  less its resident memory before; an upload over BACKGROUND_IMPORT_ROWS is answered
  `importing` and stored after: the time from the upload to the end of its import (status
  no longer `importing`), and the peak growth until then;
- while the request runs: GET /status/{id}?limit=100 and GET /requests latency (p50,
  p95) over BENCH_STATUS_SECONDS, and a 10-image batch uploaded a few seconds in: its
  upload to its webhook;
- POST /requests/{id}/cancel: the time to its answer, then to "cancelled"; then the
  time to the first byte of its result CSV, and to its first 100,000 lines;
- DELETE /requests/{id}: the time to its answer, then until the status answers 404.
The database (BENCH_POSTGRES_URL) is emptied first. Results are printed and saved under
bench-results/ as bench-million-*.json.
"""

import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from bench.__main__ import (
    DEFAULT_BROKER_URL,
    DEFAULT_POSTGRES_URL,
    FINISHED,
    RESULTS_DIR,
    SMALL_BATCH_AFTER_S,
    Bench,
    Configuration,
    Params,
    delete_and_wait,
    empty_postgres,
    ensure_postgres_database,
    percentile,
    running_service,
    say,
    service_env,
    small_batch_seconds,
    upload_small_batch,
)
from tests.support.servers import LocalServer, WebhookReceiver
from tests.support.service_process import ServiceProcess

BOUNDARY = "bench-million-boundary"
URLS_PER_ROW = 3
WAIT_S = 600.0
CSV_LINES = 100_000


def write_upload_body(path: Path, rows: int, image_url: str) -> int:
    """A multipart/form-data body holding a CSV of `rows` rows; the CSV's size."""
    csv_bytes = 0
    with path.open("wb") as body:
        body.write(
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="catalogue.csv"\r\n'
            "Content-Type: text/csv\r\n\r\n".encode()
        )
        lines = ["S. No.,Product Name,Input Image Urls\n"]
        for row in range(1, rows + 1):
            urls = ",".join(f"{image_url}?row={row}&n={n}" for n in range(URLS_PER_ROW))
            lines.append(f'{row},Product {row},"{urls}"\n')
            if len(lines) >= 10_000:
                chunk = "".join(lines).encode()
                csv_bytes += len(chunk)
                body.write(chunk)
                lines = []
        chunk = "".join(lines).encode()
        csv_bytes += len(chunk)
        body.write(chunk)
        body.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return csv_bytes


def memory_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def reset_peak(pid: int) -> None:
    """VmHWM starts again from the resident memory now (Linux: clear_refs, 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def latency_ms(call) -> float:
    start = time.perf_counter()
    response = call()
    response.raise_for_status()
    return (time.perf_counter() - start) * 1000


def summary(values: list[float]) -> dict:
    return {
        "p50": round(statistics.median(values), 1),
        "p95": round(percentile(values, 0.95), 1),
        "samples": len(values),
    }


def wait_for(predicate, what: str) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > WAIT_S:
            raise RuntimeError(f"{what}: not after {WAIT_S} s")
        time.sleep(0.1)
    return time.perf_counter() - start


def one_catalogue(service: ServiceProcess, bench: Bench, rows: int, image_url: str, status_s: float) -> dict:
    work = bench.work
    body_path = work / f"upload-{rows}.body"
    csv_bytes = write_upload_body(body_path, rows, image_url)
    pid = service.process.pid
    rss_before_kb = memory_kb(pid, "VmRSS")
    reset_peak(pid)
    start = time.perf_counter()
    with body_path.open("rb") as body:
        accepted = service.http.post(
            f"{service.base_url}/upload",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
            timeout=WAIT_S,
        )
    upload_s = time.perf_counter() - start
    if accepted.status_code != 202:
        raise RuntimeError(f"upload answered {accepted.status_code}: {accepted.text[:300]}")
    peak_growth_mb = (memory_kb(pid, "VmHWM") - rss_before_kb) / 1024
    body_path.unlink()
    request_id = accepted.json()["request_id"]
    say(f"{rows:,} rows ({csv_bytes / 1e6:.0f} MB): 202 after {upload_s:.2f} s")
    say(f"web process peak: +{peak_growth_mb:.0f} MB")

    status_ms, list_ms = [], []
    started = time.perf_counter()
    small = None
    imported_s = None if accepted.json()["status"] == "importing" else upload_s
    upload_started = start

    def poll_status(limit: int = 100) -> float:
        """One status poll's latency; notes when the import is over."""
        nonlocal imported_s
        poll_start = time.perf_counter()
        body = service.get(f"/status/{request_id}", params={"limit": limit}).json()
        if imported_s is None and body["status"] != "importing":
            imported_s = time.perf_counter() - upload_started
        return (time.perf_counter() - poll_start) * 1000

    while (elapsed := time.perf_counter() - started) < status_s:
        if small is None and elapsed >= min(SMALL_BATCH_AFTER_S, status_s / 3):
            small = upload_small_batch(service, bench, rows)
        status_ms.append(poll_status())
        list_ms.append(latency_ms(lambda: service.get("/requests")))
        time.sleep(0.05)
    small_batch_s = small_batch_seconds(bench.receiver, small or upload_small_batch(service, bench, rows))
    wait_for(lambda: poll_status(1) >= 0 and imported_s is not None, "import")
    import_growth_mb = (memory_kb(pid, "VmHWM") - rss_before_kb) / 1024
    say(f"imported {imported_s:.2f} s after the upload began; web process peak: +{import_growth_mb:.0f} MB")
    start = time.perf_counter()
    cancel = service.post(f"/requests/{request_id}/cancel")
    cancel_answer_s = time.perf_counter() - start
    if cancel.status_code not in (202, 409):
        raise RuntimeError(f"cancel answered {cancel.status_code}: {cancel.text[:300]}")
    state = service.get(f"/status/{request_id}").json()["status"]

    def is_finished() -> bool:
        return service.get(f"/status/{request_id}").json()["status"] in FINISHED

    cancelled_s = cancel_answer_s + wait_for(is_finished, "cancel")
    # The result CSV of the finished (cancelled) request: its first byte, then its first
    # 100,000 lines (the whole file of a million rows would take minutes of the bench).
    start = time.perf_counter()
    download_url = f"{service.base_url}/download/{request_id}"
    with service.http.get(download_url, stream=True, timeout=WAIT_S) as download:
        download.raise_for_status()
        lines = download.iter_lines()
        next(lines)
        first_byte_ms = (time.perf_counter() - start) * 1000
        for _ in zip(range(CSV_LINES), lines, strict=False):
            pass
        csv_lines_s = time.perf_counter() - start

    delete_answer_s, gone_s = delete_and_wait(service, request_id, WAIT_S)
    figures = {
        "rows": rows,
        "images": rows * URLS_PER_ROW,
        "csv_mb": round(csv_bytes / 1e6, 1),
        "upload_to_202_s": round(upload_s, 2),
        "peak_growth_mb": round(peak_growth_mb, 1),
        "upload_to_imported_s": round(imported_s, 2),
        "peak_growth_through_import_mb": round(import_growth_mb, 1),
        "status_ms": summary(status_ms),
        "requests_list_ms": summary(list_ms),
        "small_batch_s": round(small_batch_s, 2),
        "result_csv_first_byte_ms": round(first_byte_ms, 1),
        "result_csv_100k_lines_s": round(csv_lines_s, 2),
        "status_after_cancel": state,
        "cancel_answer_s": round(cancel_answer_s, 3),
        "cancel_to_finished_s": round(cancelled_s, 2),
        "delete_answer_s": round(delete_answer_s, 3),
        "delete_to_gone_s": round(gone_s, 2),
    }
    say(json.dumps(figures))
    return figures


def run(params: Params) -> int:
    sizes = [int(size) for size in os.environ.get("BENCH_MILLION_ROWS", "100000,1000000").split(",")]
    runners = os.environ.get("BENCH_MILLION_RUNNERS", "inprocess,celery").split(",")
    postgres_url = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    if not ensure_postgres_database(postgres_url):
        say("--million needs PostgreSQL")
        return 1
    work = Path(tempfile.mkdtemp(prefix="bench-million-"))
    say(f"work folder (logs, upload bodies, outputs): {work}")
    results: dict = {"when": datetime.now(UTC).isoformat(), "cpus": os.cpu_count(), "runs": []}
    broker_url = os.environ.get("BENCH_CELERY_BROKER_URL", DEFAULT_BROKER_URL)
    with LocalServer() as images_server, WebhookReceiver() as receiver:
        image_url = images_server.add(_tiny_jpeg())
        bench = Bench(params, work, [], [image_url], images_server, receiver, None, broker_url)  # type: ignore[arg-type]
        for runner in runners:
            config = Configuration("postgresql", runner, postgres_url)
            say(f"== {config.name}")
            empty_postgres(postgres_url)
            with running_service(service_env(bench, config), work / config.slug) as service:
                for rows in sizes:
                    figures = one_catalogue(service, bench, rows, image_url, params.status_seconds)
                    results["runs"].append({"configuration": config.name, **figures})
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"bench-million-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(results, indent=2))
    say(f"saved {path}")
    return 0


def _tiny_jpeg() -> bytes:
    import io

    from PIL import Image

    data = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(data, "JPEG", quality=90)
    return data.getvalue()
