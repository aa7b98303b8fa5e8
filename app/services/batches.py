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

from sqlalchemy import Connection, Row, Table, bindparam, func, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Image, ImageStatus, ProcessingRequest, Product, RequestStatus
from app.errors import InvalidCsv, InvalidInput, NotFound, PayloadTooLarge
from app.guarded_http import url_problem
from app.pipeline.options import OutputOptions
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


@dataclass(frozen=True)
class ParsedCsv:
    """The rows of a checked CSV, kept until they are inserted: (serial number, product
    name, image URLs joined by URL_SEPARATOR). One string per row rather than one per URL
    keeps a 50 MiB upload of short URLs to about twice its size in memory."""

    rows: list[tuple[int, str, str]]
    total_images: int
    repeated_urls: dict[str, int]  # URL -> how many more times than once it appears


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


def parse_csv(csv_file: BinaryIO, limits: CsvLimits) -> ParsedCsv:
    """Read and check the whole CSV, touching no database; raises InvalidCsv listing every
    problem found, or PayloadTooLarge."""
    errors = CsvErrors()
    products = read_products(
        csv_file,
        max_bytes=limits.max_bytes,
        max_line_bytes=limits.max_line_bytes,
        max_rows=limits.max_rows,
        max_urls_per_row=limits.max_urls_per_row,
        errors=errors,
    )
    rows: list[tuple[int, str, str]] = []
    total_images = 0
    try:
        for product in products:
            if errors:
                continue  # keep reading to report every problem, keep nothing more
            rows.append((product.serial_number, product.product_name, URL_SEPARATOR.join(product.image_urls)))
            total_images += len(product.image_urls)
    except CsvTooLarge:
        raise PayloadTooLarge(f"the CSV is larger than {limits.max_bytes} bytes") from None
    if errors:
        raise InvalidCsv(
            f"{errors.total} problem(s) found in the CSV; nothing was stored",
            errors=errors.items,
            errors_not_shown=errors.not_shown,
        )
    return ParsedCsv(rows, total_images, _repeated_urls(rows))


def create_batch(
    session: Session,
    parsed: ParsedCsv,
    *,
    webhook_url: str | None,
    owner: str | None,
    on_request_created: Callable[[ProcessingRequest], None] | None = None,
    options: OutputOptions | None = None,
) -> ProcessingRequest:
    """Store a request, its products and images, and return the request. Images are
    pending, except later rows naming a URL an earlier row of the request names: those
    are copies of the first (app/queue/copies.py), which alone is fetched."""
    request = ProcessingRequest(
        request_id=str(uuid.uuid4()),
        status=RequestStatus.PENDING,
        owner=owner,
        callback_url=webhook_url,
        total_products=len(parsed.rows),
        total_images=parsed.total_images,
        options=options.to_json() if options is not None else None,
    )
    session.add(request)
    session.flush()
    if on_request_created is not None:
        on_request_created(request)
    connection = session.connection()
    product_ids = _reserve_ids(connection, Product.__table__, len(parsed.rows))
    _insert_rows(connection, request.id, product_ids, parsed.rows, parsed.repeated_urls)
    if parsed.repeated_urls:
        _link_copies(session, request.id)
    return request


def _reserve_ids(connection: Connection, table: Table, count: int) -> Sequence[int]:
    """Ids for `count` new rows, increasing: images name their product without reading
    the products back."""
    if connection.dialect.name == "postgresql":
        return sorted(
            connection.scalars(
                text("SELECT nextval(pg_get_serial_sequence(:table, 'id')) FROM generate_series(1, :count)"),
                {"table": table.name, "count": count},
            )
        )
    # SQLite: the request row just inserted holds the database's write lock until the
    # commit, so no one else takes ids meanwhile; max + 1 is what SQLite itself picks.
    last = connection.scalar(select(func.max(table.c.id))) or 0
    return range(last + 1, last + 1 + count)


def _repeated_urls(rows: list[tuple[int, str, str]]) -> dict[str, int]:
    """How many more times than once each repeated URL appears."""
    # One join and split: about half the time of splitting row by row (100,000 rows).
    counts = Counter(URL_SEPARATOR.join(urls for _, _, urls in rows).split(URL_SEPARATOR))
    return {url: count - 1 for url, count in counts.items() if count > 1}


def _link_copies(session: Session, request_pk: int) -> None:
    """Point each copy at the image of its URL that will be processed."""
    connection = session.connection()
    sources = dict(
        connection.execute(
            select(Image.input_url, Image.id).where(Image.request_pk == request_pk, Image.copies > 0)
        ).all()
    )
    links = [
        {"copy_id": copy_id, "new_source_image_id": sources[url]}
        for copy_id, url in connection.execute(
            select(Image.id, Image.input_url).where(
                Image.request_pk == request_pk, Image.status == ImageStatus.COPY
            )
        )
    ]
    connection.execute(
        update(Image.__table__)
        .where(Image.id == bindparam("copy_id"))
        .values(source_image_id=bindparam("new_source_image_id")),
        links,
    )


PRODUCT_INSERT_COLUMNS = ("id", "request_pk", "serial_number", "product_name")
IMAGE_INSERT_COLUMNS = ("request_pk", "product_id", "position", "input_url", "status", "attempts")


def _insert_rows(
    connection: Connection,
    request_pk: int,
    product_ids: Sequence[int],
    rows: list[tuple[int, str, str]],
    repeated_urls: dict[str, int],
) -> None:
    """Rows are generated while they are sent: on PostgreSQL the server inserts one part
    while this process formats the next, and no list of 300,000 tuples is built."""
    copying = connection.dialect.name == "postgresql"
    name_value = _copy_text_value if copying else str
    urls_value = _copy_urls_value if copying else str
    products = (
        (product_id, request_pk, serial_number, name_value(name))
        for product_id, (serial_number, name, _) in zip(product_ids, rows, strict=True)
    )
    _bulk_insert(connection, Product.__table__, PRODUCT_INSERT_COLUMNS, products)
    pending = ImageStatus.PENDING.value
    if not repeated_urls:
        images = (
            (request_pk, product_id, position, url, pending, 0)
            for product_id, (_, _, urls) in zip(product_ids, rows, strict=True)
            for position, url in enumerate(urls_value(urls).split(URL_SEPARATOR))
        )
        _bulk_insert(connection, Image.__table__, IMAGE_INSERT_COLUMNS, images)
    else:
        images = _images_with_copies(request_pk, product_ids, rows, repeated_urls, urls_value)
        _bulk_insert(connection, Image.__table__, (*IMAGE_INSERT_COLUMNS, "copies"), images)


def _images_with_copies(
    request_pk: int,
    product_ids: Sequence[int],
    rows: list[tuple[int, str, str]],
    repeated_urls: dict[str, int],
    urls_value: Callable[[str], str],
) -> Iterator[tuple]:
    """Image rows where the first image of a repeated URL counts its copies and the later
    ones are copies."""
    pending, copy = ImageStatus.PENDING.value, ImageStatus.COPY.value
    first_seen: set[str] = set()
    for product_id, (_, _, urls) in zip(product_ids, rows, strict=True):
        for position, url in enumerate(urls.split(URL_SEPARATOR)):
            status, count = pending, 0
            if url in repeated_urls:
                if url in first_seen:
                    status = copy
                else:
                    first_seen.add(url)
                    count = repeated_urls[url]
            yield (request_pk, product_id, position, urls_value(url), status, 0, count)


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
    """Many rows at once, by each driver's fastest path: PostgreSQL's COPY (text format;
    the caller escapes text values with _copy_text_value) and the SQLite driver's
    executemany of plain tuples (several times faster than SQLAlchemy's per-row parameter
    processing)."""
    if connection.dialect.name == "postgresql":
        with connection.connection.dbapi_connection.cursor() as cursor:
            cursor.copy_expert(
                f"COPY {table.name} ({', '.join(columns)}) FROM STDIN", _CopyText(rows), size=COPY_READ_CHARS
            )
    else:
        values = ", ".join("?" * len(columns))
        statement = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({values})"
        with closing(connection.connection.dbapi_connection.cursor()) as cursor:
            cursor.executemany(statement, rows)


COPY_READ_CHARS = 256 * 1024


class _CopyText(io.TextIOBase):
    """Rows as COPY's text format, formatted as the driver reads them."""

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
