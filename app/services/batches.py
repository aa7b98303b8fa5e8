"""Batches: creating one from a CSV, and reading its products and images back.

Functions here only flush; the caller owns the transaction.
"""

import base64
import io
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from itertools import groupby
from typing import BinaryIO

from sqlalchemy import Connection, Engine, Row, Table, bindparam, func, insert, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Image, ImageStatus, ProcessingRequest, Product, RequestStatus
from app.errors import InvalidCsv, InvalidInput, NotFound, PayloadTooLarge
from app.ledger.units import OutputOptions
from app.net.urls import url_problem
from app.services.csv_input import (
    OUTPUT_COLUMNS,
    CsvErrors,
    CsvTooLarge,
    neutralised,
    read_products,
    write_csv_line,
)
from app.storage import OutputUrls


@dataclass(frozen=True)
class CsvLimits:
    max_bytes: int
    max_line_bytes: int
    max_rows: int
    max_urls_per_row: int


# Checked URLs hold no whitespace, so a newline can separate them.
URL_SEPARATOR = "\n"


PRODUCT_COLUMNS = (Product.id, Product.serial_number, Product.product_name)
IMAGE_COLUMNS = (
    Image.product_id,
    Image.input_url,
    Image.output_key,
    Image.status,
    Image.error_code,
    Image.error_message,
    Image.input_bytes,
    Image.output_bytes,
    Image.width,
    Image.height,
    Image.kept_original,
)


@dataclass(frozen=True)
class ProductWithImages:
    """A product row and its image rows (the columns above), in CSV order."""

    product: Row
    images: list[Row]


MAX_ID = 2**63 - 1  # the largest integer SQLite stores, so the largest id of any table
MAX_CURSOR_CHARS = 40


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id in a cursor from encode_cursor; anything else is refused with 422, never
    passed to the database (an id past 64 bits cannot even be bound on SQLite)."""
    if not cursor:
        return None
    last_id = None
    if len(cursor) <= MAX_CURSOR_CHARS:
        try:
            text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        except ValueError:
            text = ""
        version, _, value = text.partition(":")
        if version == "v1" and value.isdigit() and 0 < int(value) <= MAX_ID:
            last_id = int(value)
    # Only the exact spelling the service writes: no padding, stray characters or zeros.
    if last_id is None or encode_cursor(last_id) != cursor:
        raise InvalidInput("the cursor is not one this service issued", cursor=cursor[:100])
    return last_id


def checked_webhook_url(webhook_url: str | None) -> str | None:
    webhook_url = (webhook_url or "").strip() or None
    if webhook_url:
        problem = url_problem(webhook_url)
        if problem:
            raise InvalidInput(f"webhook_url: {problem}")
    return webhook_url


class CheckedRows:
    """An uploaded CSV's rows as they are read and checked, each (serial number, product
    name, image URLs joined by URL_SEPARATOR): one string per row rather than one per URL
    keeps a 50 MiB upload of short URLs to about twice its size in memory.

    Iterating yields the good rows up to the first problem, then reads on without yielding
    to find every problem; raise_problems() then raises InvalidCsv listing them, or
    PayloadTooLarge. `rows` keeps the rows yielded."""

    def __init__(self, csv_file: BinaryIO, limits: CsvLimits):
        self.limits = limits
        self.errors = CsvErrors()
        self.too_large = False
        self.rows: list[tuple[int, str, str]] = []
        self.total_images = 0
        self._products = read_products(
            csv_file,
            max_bytes=limits.max_bytes,
            max_line_bytes=limits.max_line_bytes,
            max_rows=limits.max_rows,
            max_urls_per_row=limits.max_urls_per_row,
            errors=self.errors,
        )

    def __iter__(self) -> Iterator[tuple[int, str, str]]:
        try:
            for product in self._products:
                if self.errors:
                    continue  # keep reading to report every problem, keep nothing more
                row = (product.serial_number, product.product_name, URL_SEPARATOR.join(product.image_urls))
                self.rows.append(row)
                self.total_images += len(product.image_urls)
                yield row
        except CsvTooLarge:
            self.too_large = True

    def raise_problems(self) -> None:
        if self.too_large:
            raise PayloadTooLarge(f"the CSV is larger than {self.limits.max_bytes} bytes")
        if self.errors:
            raise InvalidCsv(
                f"{self.errors.total} problem(s) found in the CSV; nothing was stored",
                errors=self.errors.items,
                errors_not_shown=self.errors.not_shown,
            )


def parse_csv(csv_file: BinaryIO, limits: CsvLimits) -> CheckedRows:
    """Read and check the whole CSV, touching no database; raises InvalidCsv listing every
    problem found, or PayloadTooLarge."""
    checked = CheckedRows(csv_file, limits)
    for _ in checked:
        pass
    checked.raise_problems()
    return checked


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
    streaming = _uses_copy(session.get_bind())
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
    most_rows = _most_rows(csv_file, limits) if streaming else len(checked.rows)
    product_ids = _reserve_ids(connection, Product.__table__, most_rows)
    copies = _insert_images(
        connection, request.id, _numbered(checked if streaming else checked.rows, product_ids)
    )
    checked.raise_problems()
    name_value = _copy_text_value if streaming else str
    products = (
        (product_id, request.id, serial_number, name_value(name))
        for product_id, (serial_number, name, _) in zip(product_ids, checked.rows, strict=False)
    )
    _bulk_insert(connection, Product.__table__, PRODUCT_INSERT_COLUMNS, products)
    if streaming:
        request.total_products, request.total_images = len(checked.rows), checked.total_images
        session.flush()
    if copies:
        _count_and_link_copies(connection, request.id, copies)
    # Last: what it does (an idempotency key's row, expired ones deleted) then holds its
    # locks for the commit only, not while a large CSV is read.
    if on_request_created is not None:
        on_request_created(request)
    return request


def _most_rows(csv_file: BinaryIO, limits: CsvLimits) -> int:
    """An upper bound of the rows of a CSV (a seekable file, left where it was): its line
    breaks (the header takes a line; a CR LF split between blocks counts twice, which is
    harmless), at most max_rows."""
    start = csv_file.tell()
    breaks = seen = 0
    while seen <= limits.max_bytes and (block := csv_file.read(1 << 20)):
        seen += len(block)
        breaks += block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")
    csv_file.seek(start)
    return min(breaks + 1, limits.max_rows)


def _numbered(rows: Iterable[tuple[int, str, str]], ids: Sequence[int]) -> Iterator[tuple[int, tuple]]:
    """(id, row) pairs; every row gets one (ids are at least as many as the rows)."""
    unused = iter(ids)
    for row in rows:
        yield next(unused), row


def _reserve_ids(connection: Connection, table: Table, count: int) -> Sequence[int]:
    """Ids for `count` new rows, increasing: images name their product before the products
    are stored. Ids left unused are gaps, as rolled back inserts leave."""
    if connection.dialect.name == "postgresql":
        # The sequence's name first: nextval() of a constant is about 8 times faster than
        # of an expression, which is looked up again for every row.
        sequence = connection.scalar(
            text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table.name}
        )
        return sorted(
            connection.scalars(
                text("SELECT nextval(CAST(:sequence AS regclass)) FROM generate_series(1, :count)"),
                {"sequence": sequence, "count": count},
            )
        )
    # SQLite: the request row just inserted holds the database's write lock until the
    # commit, so no one else takes ids meanwhile; max + 1 is what SQLite itself picks.
    last = connection.scalar(select(func.max(table.c.id))) or 0
    return range(last + 1, last + 1 + count)


PRODUCT_INSERT_COLUMNS = ("id", "request_pk", "serial_number", "product_name")
IMAGE_INSERT_COLUMNS = ("request_pk", "product_id", "position", "input_url", "status", "attempts")


def _insert_images(
    connection: Connection, request_pk: int, numbered_rows: Iterable[tuple[int, tuple[int, str, str]]]
) -> Counter[str]:
    """Insert the images of the rows as they come; returns how many copies each repeated
    URL has. Rows are formatted while they are sent: on PostgreSQL the server inserts one
    part while this process formats the next, and no list of 300,000 tuples is built."""
    urls_value = _copy_urls_value if _uses_copy(connection) else str
    pending, copy = ImageStatus.PENDING.value, ImageStatus.COPY.value
    seen: set[str] = set()
    copies: Counter[str] = Counter()

    def images() -> Iterator[tuple]:
        for product_id, (_, _, urls) in numbered_rows:
            for position, url in enumerate(urls.split(URL_SEPARATOR)):
                status = pending
                if url in seen:
                    status = copy
                    copies[url] += 1
                else:
                    seen.add(url)
                yield (request_pk, product_id, position, urls_value(url), status, 0)

    _bulk_insert(connection, Image.__table__, IMAGE_INSERT_COLUMNS, images())
    return copies


def _count_and_link_copies(connection: Connection, request_pk: int, copies: Counter[str]) -> None:
    """Give the first image of each repeated URL its count of copies, and point each copy
    at it."""
    sources = {
        url: image_id
        for image_id, url in connection.execute(
            select(Image.id, Image.input_url).where(
                Image.request_pk == request_pk, Image.status == ImageStatus.PENDING
            )
        )
        if url in copies
    }
    connection.execute(
        update(Image.__table__).where(Image.id == bindparam("source_id")).values(copies=bindparam("count")),
        [{"source_id": sources[url], "count": count} for url, count in copies.items()],
    )
    connection.execute(
        update(Image.__table__)
        .where(Image.id == bindparam("copy_id"))
        .values(source_image_id=bindparam("new_source_image_id")),
        [
            {"copy_id": copy_id, "new_source_image_id": sources[url]}
            for copy_id, url in connection.execute(
                select(Image.id, Image.input_url).where(
                    Image.request_pk == request_pk, Image.status == ImageStatus.COPY
                )
            )
        ],
    )


_COPY_TEXT_SPECIAL = re.compile(r"[\\\t\n\r]")
_COPY_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text_value(value: str) -> str:
    """value in COPY's text format."""
    return value.translate(_COPY_TEXT_ESCAPES) if _COPY_TEXT_SPECIAL.search(value) else value


def _copy_urls_value(urls: str) -> str:
    """Checked URLs in COPY's text format: they hold no whitespace or control characters,
    so only a backslash needs escaping (and URL_SEPARATOR stays a separator)."""
    return urls.replace("\\", "\\\\")


def _bulk_insert(
    connection: Connection, table: Table, columns: tuple[str, ...], rows: Iterable[tuple]
) -> None:
    """Many rows at once, by each driver's fastest path: psycopg2's COPY (text format;
    the caller escapes text values with _copy_text_value when _uses_copy), the SQLite
    driver's executemany of plain tuples (several times faster than SQLAlchemy's per-row
    parameter processing), and SQLAlchemy's executemany elsewhere."""
    if _uses_copy(connection):
        with connection.connection.dbapi_connection.cursor() as cursor:
            cursor.copy_expert(
                f"COPY {table.name} ({', '.join(columns)}) FROM STDIN", _CopyText(rows), size=COPY_READ_CHARS
            )
    elif connection.dialect.name == "sqlite":
        values = ", ".join("?" * len(columns))
        statement = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({values})"
        with closing(connection.connection.dbapi_connection.cursor()) as cursor:
            cursor.executemany(statement, rows)
    else:
        connection.execute(insert(table), [dict(zip(columns, row, strict=True)) for row in rows])


def _uses_copy(bind: Connection | Engine) -> bool:
    return bind.dialect.driver == "psycopg2"


COPY_READ_CHARS = 256 * 1024


class _CopyText(io.TextIOBase):
    """Rows as COPY's text format, formatted as the driver reads them. The rows must not
    raise: psycopg2 reports any exception from read() as a cancelled query, which is why
    CheckedRows records the CSV's problems and raises them after the COPY."""

    def __init__(self, rows: Iterable[tuple]):
        self.rows = iter(rows)

    def read(self, size: int = -1) -> str:
        lines: list[str] = []
        length = 0
        for row in self.rows:
            line = "\t".join(map(str, row)) + "\n"
            lines.append(line)
            length += len(line)
            if 0 <= size <= length:
                break
        return "".join(lines)


def get_request(session: Session, request_id: str, owner: str | None) -> ProcessingRequest:
    query = select(ProcessingRequest).where(ProcessingRequest.request_id == request_id)
    if owner is not None:
        query = query.where(ProcessingRequest.owner == owner)
    request = session.scalars(query).one_or_none()
    if request is None:
        raise NotFound(f"no request with id {request_id!r}")
    return request


def products_page(
    session: Session, request_pk: int, *, after_id: int | None, limit: int
) -> tuple[list[ProductWithImages], int | None]:
    """Products in CSV order after the cursor, with their images; and the next cursor id."""
    # Plain rows of the columns shown, not ORM objects: this runs on every status poll.
    query = (
        select(*PRODUCT_COLUMNS).where(Product.request_pk == request_pk).order_by(Product.id).limit(limit + 1)
    )
    if after_id is not None:
        query = query.where(Product.id > after_id)
    products = session.execute(query).all()
    has_more = len(products) > limit
    products = products[:limit]
    if not products:
        return [], None
    images = session.execute(
        select(*IMAGE_COLUMNS)
        .where(Image.product_id.in_([p.id for p in products]))
        .order_by(Image.product_id, Image.position)
    )
    by_product = {pid: list(group) for pid, group in groupby(images, key=lambda i: i.product_id)}
    page = [ProductWithImages(p, by_product.get(p.id, [])) for p in products]
    return page, products[-1].id if has_more else None


def requests_page(
    session: Session, owner: str | None, *, before_id: int | None, limit: int
) -> tuple[list[ProcessingRequest], int | None]:
    query = select(ProcessingRequest).order_by(ProcessingRequest.id.desc()).limit(limit + 1)
    if owner is not None:
        query = query.where(ProcessingRequest.owner == owner)
    if before_id is not None:
        query = query.where(ProcessingRequest.id < before_id)
    items = list(session.scalars(query))
    has_more = len(items) > limit
    items = items[:limit]
    return items, items[-1].id if has_more and items else None


def result_csv_lines(
    sessions: sessionmaker[Session],
    request_pk: int,
    urls: OutputUrls,
    *,
    escape_formulas: bool,
    chunk: int = 1000,
) -> Iterator[str]:
    """The result CSV, a page of products at a time, in a session of its own: it is read
    while the response streams, after the request's own session has closed. With
    escape_formulas, cells that start like a spreadsheet formula are neutralised."""
    yield write_csv_line(list(OUTPUT_COLUMNS))
    after_id = None
    while True:
        with sessions() as session:
            page, after_id = products_page(session, request_pk, after_id=after_id, limit=chunk)
        for item in page:
            cells = [
                str(item.product.serial_number),
                item.product.product_name,
                ",".join(image.input_url for image in item.images),
                ",".join(urls.url(image.output_key) or "" for image in item.images),
            ]
            yield write_csv_line([neutralised(cell) for cell in cells] if escape_formulas else cells)
        if after_id is None:
            return
