"""`python -m bench.catalogue`: a big catalogue's operations in process, without the HTTP
around them: storing an upload (`create_batch`, the whole CSV read, checked and
inserted), cancelling all its images (`cancel_the_rest`, the batches the API starts
after its answer) and producing its result CSV (`result_csv_lines`, every line). A
catalogue of BENCH_CATALOGUE_ROWS rows (100,000), 3 URLs a row on 7 hosts, every URL
unique. Prints the wall and CPU seconds of this process for each: where the wall time is
longer, the database did the rest. On PostgreSQL the tables are analysed after the
upload, as the service does after its 202. SQLite by default; BENCH_CATALOGUE_DATABASE_URL for
another database (emptied first)."""

import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import text

from app.composition import build_parts
from app.config import Settings
from app.db.session import reader_sessionmaker, writer_sessionmaker
from app.services.batches import create_batch
from app.services.csv_checks import CsvLimits
from app.services.lifecycle import cancel_the_rest
from app.services.results import result_csv_lines
from app.storage import OutputUrls
from bench.__main__ import csv_bytes, env_int, fresh_schema, say

HOSTS = 7
URLS_PER_ROW = 3


@contextmanager
def timed(label: str) -> Iterator[Callable[[str], None]]:
    """Prints the label with the wall and CPU seconds of the block, and what the block adds."""
    notes: list[str] = []
    cpu, wall = time.process_time(), time.perf_counter()
    yield notes.append
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    say(f"{label}: {wall:.2f} s wall, {cpu:.2f} s CPU of this process{''.join(notes)}")


def main() -> None:
    rows = env_int("BENCH_CATALOGUE_ROWS", 100_000)
    work = Path(tempfile.mkdtemp(prefix="bench-catalogue-"))
    database_url = os.environ.get("BENCH_CATALOGUE_DATABASE_URL", f"sqlite:///{work / 'catalogue.db'}")
    fresh_schema(database_url)
    settings = Settings(
        _env_file=None, database_url=database_url, media_root=work / "media", public_base_url="http://bench"
    )
    parts = build_parts(settings, runs_images=False)
    urls = [f"http://img{n % HOSTS}.example.com/catalogue/{n}.jpg" for n in range(rows * URLS_PER_ROW)]
    csv_file = csv_bytes(urls, URLS_PER_ROW)
    limits = CsvLimits(max_bytes=1 << 31, max_line_bytes=1 << 20, max_rows=10**7, max_urls_per_row=50)
    say(f"{database_url.split(':')[0]}: {rows:,} rows, {len(urls):,} images, {len(csv_file) / 1e6:.0f} MB")
    try:
        with timed("upload (create_batch)"), writer_sessionmaker(parts.engine).begin() as session:
            request = create_batch(session, io.BytesIO(csv_file), limits, webhook_url=None, owner=None)
        if parts.engine.dialect.name == "postgresql":
            # What the service starts on a thread after its 202 (app/db/maintenance.py).
            with timed("ANALYZE products, images"), parts.engine.connect() as connection:
                connection.execute(text("ANALYZE products"))
                connection.execute(text("ANALYZE images"))
                connection.commit()
        with timed("result CSV, every line (pending images)") as note:
            lines = sum(
                chunk.count("\n")
                for chunk in result_csv_lines(
                    reader_sessionmaker(parts.engine),
                    request.id,
                    OutputUrls(settings.output_url_base),
                    escape_formulas=True,
                )
            )
            note(f"; {lines:,} lines")
        with timed("cancel, every image (cancel_the_rest)"):
            cancel_the_rest(parts.ledger, request.id)
    finally:
        parts.close()


if __name__ == "__main__":
    main()
