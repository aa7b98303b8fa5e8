"""Creating a batch from an uploaded CSV: its request, products and images.

Functions here only flush; the caller owns the transaction."""

import io
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.db.models import ProcessingRequest, RequestStatus
from app.errors import InvalidInput
from app.ledger.units import OutputOptions
from app.net.urls import url_problem
from app.services.bulk_insert import (
    CHUNK_ROWS,
    RepeatedUrls,
    insert_hosts,
    insert_rows,
    link_copies,
    uses_copy,
)
from app.services.csv_checks import CheckedRows, CsvLimits, SpooledRows, check_csv, most_rows
from app.services.imports import create_importing_request


@dataclass(frozen=True)
class BackgroundImports:
    """Uploads of more than `above_rows` rows are stored after their answer, from a file
    of their checked rows under `import_dir` (app/services/imports.py)."""

    above_rows: int
    import_dir: Path


def checked_webhook_url(webhook_url: str | None) -> str | None:
    webhook_url = (webhook_url or "").strip() or None
    if webhook_url:
        problem = url_problem(webhook_url)
        if problem:
            raise InvalidInput(f"webhook_url: {problem}")
    return webhook_url


def create_batch(
    session: Session,
    csv_file: BinaryIO,
    limits: CsvLimits,
    *,
    webhook_url: str | None,
    owner: str | None,
    on_request_created: Callable[[ProcessingRequest], None] | None = None,
    options: OutputOptions | None = None,
    chunk_rows: int = CHUNK_ROWS,
    background: BackgroundImports | None = None,
) -> ProcessingRequest:
    """Read and check a CSV (a seekable file: the upload's spooled body) and store it as a
    request with its products and images; returns the request, or raises as check_csv
    does (the caller's transaction then holds a part of the rows and must be rolled
    back). Images are pending, except later rows naming a URL an earlier row of the
    request names: those are copies of the first (app/ledger/copies.py), which alone is
    fetched.

    Memory stays flat whatever the size: rows go to the database in chunks as they are
    read (bulk_insert.insert_rows), repeated URLs are found by the database among the few
    a fixed-size filter flags (RepeatedUrls, link_copies). On PostgreSQL (with psycopg2's
    COPY) the rows are checked while they are sent: the server inserts on one core while
    this process reads the CSV on the other, and the transaction holds no lock another
    upload or a worker waits for until its last statements. Elsewhere the whole CSV is
    checked first, its good rows spooled to a temporary file (check_csv) and stored from
    there: on SQLite the write transaction holds the database's one write lock, which
    every upload and worker waits for, so it is taken only once the file is known to be
    good.

    With `background`, a CSV of more lines than it allows is only checked here: the
    request is `importing`, and its rows are stored after the answer
    (app/services/imports.py)."""
    start = csv_file.tell()
    csv_bytes = csv_file.seek(0, io.SEEK_END) - start
    csv_file.seek(start)
    lines = most_rows(csv_file, limits) if background is not None and background.above_rows else None
    # most_rows counts the header's line break, and one more than the breaks: the rows of a
    # file whose every line ends in one are `lines - 2`.
    if lines is not None and lines - 2 > background.above_rows:
        request = create_importing_request(
            session,
            csv_file,
            limits,
            background.import_dir,
            webhook_url=webhook_url,
            owner=owner,
            options=options,
        )
        if on_request_created is not None:
            on_request_created(request)
        return request
    checked: CheckedRows | SpooledRows
    if uses_copy(session.get_bind()):
        bound = lines if lines is not None else most_rows(csv_file, limits)
        checked = CheckedRows(csv_file, limits)
    else:
        checked = check_csv(csv_file, limits)
        bound = checked.row_count
    request = ProcessingRequest(
        request_id=str(uuid.uuid4()),
        status=RequestStatus.PENDING,
        owner=owner,
        callback_url=webhook_url,
        options=options.to_json() if options is not None else None,
    )
    session.add(request)
    session.flush()
    connection = session.connection()
    hosts: set[str] = set()
    repeated = RepeatedUrls(csv_bytes)
    insert_rows(connection, request.id, checked, bound, hosts, repeated, chunk_rows)
    checked.raise_problems()
    request.total_products, request.total_images = checked.row_count, checked.total_images
    request.host_count = len(hosts)
    session.flush()
    link_copies(connection, request.id, repeated.flagged)
    insert_hosts(connection, hosts)
    # Last: what it does (an idempotency key's row, expired ones deleted) then holds its
    # locks for the commit only, not while a large CSV is read.
    if on_request_created is not None:
        on_request_created(request)
    return request
