"""`python -m bench.ledger`: the ledger's own cost per image, without images: claim the
next images (16 at a time, as the in-process runner on 2 cores), read what earlier
imports left, and record made-up successes, until a batch of BENCH_LEDGER_IMAGES (6,000)
is done; then the same URLs again, as a re-import. Prints CPU milliseconds per image of
this one process, which moves much less than a rate on a machine shared with other work.
SQLite by default; BENCH_LEDGER_DATABASE_URL for another database (emptied first). Every
URL names one host, allowed 64 images in flight as in `make bench`."""

import io
import os
import tempfile
import time
from pathlib import Path

from app.composition import build_parts
from app.config import Settings
from app.db.session import writer_sessionmaker
from app.ledger.units import ImageOutcome, SourceState, WorkUnit
from app.services.batches import create_batch
from app.services.csv_checks import CsvLimits
from bench.__main__ import csv_bytes, fresh_schema, say

CLAIM = 16
URLS_PER_ROW = 3


def succeeded(unit: WorkUnit) -> ImageOutcome:
    return ImageOutcome(
        unit,
        output_key=f"{unit.request_id}/{unit.image_id}.jpg",
        input_bytes=1_000,
        output_bytes=500,
        width=64,
        height=64,
        source_format="JPEG",
        fetch_seconds=0.001,
        compress_seconds=0.001,
        content_type="image/jpeg",
        thumbnail_key=f"{unit.request_id}/thumbs/{unit.image_id}.jpg",
        source=SourceState(content_sha256="ab" * 32, etag='"v1"', last_modified=None),
    )


def drain(ledger) -> tuple[int, int]:
    """Claim, look up and record until nothing is left; (images, of them revalidated)."""
    done = revalidated = 0
    last_served = 0
    while True:
        claim = ledger.claim_next(CLAIM, last_served, expired_too=True)
        last_served = claim.last_request_served
        units = ledger.with_revalidation(claim.units)
        if not units:
            return done, revalidated
        revalidated += sum(unit.revalidation is not None for unit in units)
        ledger.record_outcomes([succeeded(unit) for unit in units])
        done += len(units)


def main() -> None:
    images = int(os.environ.get("BENCH_LEDGER_IMAGES", "6000"))
    work = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    database_url = os.environ.get("BENCH_LEDGER_DATABASE_URL", f"sqlite:///{work / 'ledger.db'}")
    fresh_schema(database_url)
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        media_root=work / "media",
        public_base_url="http://bench",
        fetch_per_host_concurrency=64,
    )
    parts = build_parts(settings, runs_images=False)
    urls = [f"http://127.0.0.1:9/{n}.jpg" for n in range(images - images % URLS_PER_ROW)]
    csv_file = csv_bytes(urls, URLS_PER_ROW)
    limits = CsvLimits(max_bytes=1 << 30, max_line_bytes=1 << 20, max_rows=10**7, max_urls_per_row=50)
    try:
        for label in ("first import", "re-import"):
            with writer_sessionmaker(parts.engine).begin() as session:
                create_batch(session, io.BytesIO(csv_file), limits, webhook_url=None, owner=None)
            cpu, wall = time.process_time(), time.perf_counter()
            done, revalidated = drain(parts.ledger)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            say(
                f"{label}: {done} images, {1000 * cpu / done:.3f} ms CPU and {1000 * wall / done:.3f} ms "
                f"wall per image ({revalidated} revalidated)"
            )
    finally:
        parts.close()


if __name__ == "__main__":
    main()
