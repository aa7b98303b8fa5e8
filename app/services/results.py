"""Reading a batch back: one request (scoped to its owner), pages of its products with their
images, pages of requests, cursors, and the result CSV."""

import base64
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import groupby

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Image, ProcessingRequest, Product
from app.errors import InvalidInput, NotFound
from app.services.csv_input import (
    OUTPUT_COLUMNS,
    neutralised,
)
from app.storage import OutputUrls

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
    Image.retry_at,
    Image.reused,
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
    while the response streams, after the request's own session has closed. Yields the
    header, then each page's lines as one string: the response sends each item on its
    own, after a hop to a thread, which cost more than writing the line. With
    escape_formulas, cells that start like a spreadsheet formula are neutralised."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(OUTPUT_COLUMNS)
    yield buffer.getvalue()
    output_url = urls.url
    after_id = None
    while True:
        with sessions() as session:
            page, after_id = products_page(session, request_pk, after_id=after_id, limit=chunk)
        buffer.seek(0)
        buffer.truncate()
        for item in page:
            cells = [
                str(item.product.serial_number),
                item.product.product_name,
                ",".join(image.input_url for image in item.images),
                ",".join(output_url(image.output_key) or "" for image in item.images),
            ]
            writer.writerow([neutralised(cell) for cell in cells] if escape_formulas else cells)
        if page:
            yield buffer.getvalue()
        if after_id is None:
            return
