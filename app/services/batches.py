"""Creating a batch from an uploaded CSV: its request, products and images.

Functions here only flush; the caller owns the transaction."""

import uuid
from collections.abc import Callable
from typing import BinaryIO

from sqlalchemy.orm import Session

from app.db.models import ProcessingRequest, Product, RequestStatus
from app.errors import InvalidInput
from app.ledger.units import OutputOptions
from app.net.urls import url_problem
from app.services.bulk_insert import (
    PRODUCT_INSERT_COLUMNS,
    bulk_insert,
    copy_text_value,
    count_and_link_copies,
    insert_hosts,
    insert_images,
    numbered,
    reserve_ids,
    uses_copy,
)
from app.services.csv_checks import CheckedRows, CsvLimits, most_rows, parse_csv


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
) -> ProcessingRequest:
    """Read and check a CSV and store it as a request with its products and images;
    returns the request, or raises as parse_csv does (the caller's transaction then holds
    a part of the rows and must be rolled back). Images are pending, except later rows
    naming a URL an earlier row of the request names: those are copies of the first
    (app/ledger/copies.py), which alone is fetched.

    On PostgreSQL (with psycopg2's COPY) the rows are checked while they are sent: the
    server inserts images on one core while this process reads the CSV on the other.
    Elsewhere the whole CSV is checked before the first write: on SQLite the write
    transaction holds the database's one write lock, which every upload and worker waits
    for."""
    streaming = uses_copy(session.get_bind())
    checked = CheckedRows(csv_file, limits) if streaming else parse_csv(csv_file, limits)
    request = ProcessingRequest(
        request_id=str(uuid.uuid4()),
        status=RequestStatus.PENDING,
        owner=owner,
        callback_url=webhook_url,
        total_products=len(checked.rows),
        total_images=checked.total_images,
        options=options.to_json() if options is not None else None,
    )
    session.add(request)
    session.flush()
    connection = session.connection()
    row_ids = most_rows(csv_file, limits) if streaming else len(checked.rows)
    product_ids = reserve_ids(connection, Product.__table__, row_ids)
    hosts: set[str] = set()
    copies = insert_images(
        connection, request.id, numbered(checked if streaming else checked.rows, product_ids), hosts
    )
    request.host_count = len(hosts)
    checked.raise_problems()
    name_value = copy_text_value if streaming else str
    products = (
        (product_id, request.id, serial_number, name_value(name))
        for product_id, (serial_number, name, _) in zip(product_ids, checked.rows, strict=False)
    )
    bulk_insert(connection, Product.__table__, PRODUCT_INSERT_COLUMNS, products)
    if streaming:
        request.total_products, request.total_images = len(checked.rows), checked.total_images
        session.flush()
    if copies:
        count_and_link_copies(connection, request.id, copies)
    insert_hosts(connection, hosts)
    # Last: what it does (an idempotency key's row, expired ones deleted) then holds its
    # locks for the commit only, not while a large CSV is read.
    if on_request_created is not None:
        on_request_created(request)
    return request
