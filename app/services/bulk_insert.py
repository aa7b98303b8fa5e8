"""Inserting a batch's rows in bulk: ids reserved up front, COPY on PostgreSQL (psycopg2),
SQLAlchemy's executemany elsewhere. Only flushes; the caller owns the transaction."""

import io
import json
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing

from sqlalchemy import Connection, Engine, Table, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app.db.models import Host, Image, ImageStatus, Product
from app.net.urls import UrlHosts
from app.services.csv_checks import URL_SEPARATOR


def reserve_ids(connection: Connection, table: Table, count: int) -> Sequence[int]:
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

IMAGE_INSERT_COLUMNS = ("request_pk", "product_id", "position", "input_url", "status", "attempts", "host")

# Rows stored per chunk: the products of a chunk wait in memory (about 200 bytes a row)
# while its images are sent, so this bounds what an upload holds, whatever its size.
CHUNK_ROWS = 20_000


def insert_rows(
    connection: Connection,
    request_pk: int,
    rows: Iterable[tuple[int, str, str]],
    most_rows: int,
    hosts: set[str],
    repeated: "RepeatedUrls",
    chunk_rows: int = CHUNK_ROWS,
) -> None:
    """Insert the products and images of checked rows as they come, in chunks of
    chunk_rows: ids for a chunk's products, its images (formatted while they are sent: on
    PostgreSQL the server inserts one part while this process reads the next), then its
    products. Each image is pending, with its origin host (added to `hosts`); `repeated`
    notes which URLs may have come before (link_copies then makes them copies).
    `most_rows` bounds the rows, so no more ids are taken than the file can use."""
    rows = iter(rows)
    name_value = copy_text_value if uses_copy(connection) else str
    left = most_rows
    while left > 0:
        product_ids = reserve_ids(connection, Product.__table__, min(chunk_rows, left))
        left -= len(product_ids)
        products: list[tuple] = []

        def chunk(product_ids: Sequence[int] = product_ids, products: list[tuple] = products) -> Iterator:
            # zip takes an id before a row: a chunk whose ids ran out reads no row more.
            for product_id, row in zip(product_ids, rows):  # noqa: B905 - the rows may be fewer
                products.append((product_id, request_pk, row[0], name_value(row[1])))
                yield product_id, row[2]

        _insert_images(connection, request_pk, chunk(), hosts, repeated)
        bulk_insert(connection, Product.__table__, PRODUCT_INSERT_COLUMNS, products)
        if len(products) < len(product_ids):
            return
    # Every id is used: the rest of the file can hold no good row (past max_rows), but is
    # read all the same, for its problems.
    if next(rows, None) is not None:
        raise RuntimeError("a row more than the file's line breaks")


class RepeatedUrls:
    """Which URLs of an upload may have come before in it, in memory that does not grow
    with the upload: a Bloom filter of one hash (a bit a slot, at most 32 MiB), sized from
    the file's bytes so that it holds at least 16 slots per URL. A URL whose slot is set
    already is `flagged`: a repeat, or about 1 URL in 50 or fewer that only shares a slot.
    The database then finds the real repeats among the flagged ones (link_copies), so
    memory grows only with the URLs that do repeat, not with the upload."""

    MAX_SLOTS_LOG2 = 28

    def __init__(self, csv_bytes: int):
        slots_log2 = min(self.MAX_SLOTS_LOG2, max(16, (2 * csv_bytes).bit_length()))
        self.mask = (1 << slots_log2) - 1
        self.slots = bytearray(1 << (slots_log2 - 3))
        self.flagged: set[str] = set()


def _insert_images(
    connection: Connection,
    request_pk: int,
    products: Iterable[tuple[int, str]],
    hosts: set[str],
    repeated: RepeatedUrls,
) -> None:
    urls_value = _copy_urls_value if uses_copy(connection) else str
    pending = ImageStatus.PENDING.value
    slots, mask, flagged = repeated.slots, repeated.mask, repeated.flagged

    def images() -> Iterator[tuple]:
        host_of = UrlHosts()
        last_host, host_value = None, ""
        for product_id, urls in products:
            for position, url in enumerate(urls.split(URL_SEPARATOR)):
                slot = hash(url) & mask
                bit = 1 << (slot & 7)
                if slots[slot >> 3] & bit:
                    flagged.add(url)
                else:
                    slots[slot >> 3] |= bit
                host = host_of(url)
                if host is not last_host:
                    last_host, host_value = host, urls_value(host)
                    hosts.add(host)
                yield (request_pk, product_id, position, urls_value(url), pending, 0, host_value)

    bulk_insert(connection, Image.__table__, IMAGE_INSERT_COLUMNS, images())


def insert_hosts(connection: Connection, hosts: set[str]) -> None:
    """A row for each host not known yet: claims lock their hosts' rows (PostgreSQL).
    Called last in an upload, so a second upload naming the same host waits for these
    uncommitted rows only during the commit."""
    if not hosts:
        return
    dialect_insert = postgresql_insert if connection.dialect.name == "postgresql" else sqlite_insert
    connection.execute(
        dialect_insert(Host.__table__).on_conflict_do_nothing(index_elements=["name"]),
        [{"name": host} for host in sorted(hosts)],
    )


def link_copies(connection: Connection, request_pk: int, urls: set[str]) -> None:
    """Among the request's images naming one of `urls`, the later images of each URL
    named more than once become copies of its first image, which counts them.

    One read of the request's images that name one of `urls` (a pass over the request's
    rows with a hashed filter), then updates by primary key. Not one UPDATE joining the
    images to their first image by URL: until the ANALYZE after the upload, PostgreSQL
    believes the new request has no rows and picks a nested loop, a pass over the
    request's images for each of them. Memory: the ids of the repeated images (16 bytes
    each), beside the URLs already flagged."""
    if not urls:
        return
    if connection.dialect.name == "postgresql":
        named, urls_value = "input_url = ANY(:urls)", sorted(urls)
    else:  # SQLite: one parameter, whatever the number of URLs
        named, urls_value = "input_url IN (SELECT value FROM json_each(:urls))", json.dumps(sorted(urls))
    first: dict[str, int] = {}
    copies: Counter[str] = Counter()
    copy_ids, source_ids = array("q"), array("q")
    named_images = connection.execute(
        text(f"SELECT id, input_url FROM images WHERE request_pk = :request_pk AND {named} ORDER BY id"),
        {"request_pk": request_pk, "urls": urls_value},
    )
    for image_id, url in named_images:
        source_id = first.setdefault(url, image_id)
        if source_id != image_id:
            copy_ids.append(image_id)
            source_ids.append(source_id)
            copies[url] += 1
    for start in range(0, len(copy_ids), LINK_BATCH):
        connection.execute(
            update(Image.__table__)
            .where(Image.id == bindparam("copy_id"))
            .values(status=ImageStatus.COPY, source_image_id=bindparam("new_source_image_id")),
            [
                {"copy_id": copy_id, "new_source_image_id": source_id}
                for copy_id, source_id in zip(
                    copy_ids[start : start + LINK_BATCH], source_ids[start : start + LINK_BATCH], strict=True
                )
            ],
        )
    if copies:
        connection.execute(
            update(Image.__table__)
            .where(Image.id == bindparam("source_id"))
            .values(copies=bindparam("count")),
            [{"source_id": first[url], "count": count} for url, count in copies.items()],
        )


LINK_BATCH = 5000


_COPY_TEXT_SPECIAL = re.compile(r"[\\\t\n\r]")

_COPY_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def copy_text_value(value: str) -> str:
    """value in COPY's text format."""
    return value.translate(_COPY_TEXT_ESCAPES) if _COPY_TEXT_SPECIAL.search(value) else value


def _copy_urls_value(urls: str) -> str:
    """Checked URLs in COPY's text format: they hold no whitespace or control characters,
    so only a backslash needs escaping (and URL_SEPARATOR stays a separator)."""
    return urls.replace("\\", "\\\\")


def bulk_insert(
    connection: Connection, table: Table, columns: tuple[str, ...], rows: Iterable[tuple]
) -> None:
    """Many rows at once, by each driver's fastest path: psycopg2's COPY (text format;
    the caller escapes text values with copy_text_value when uses_copy), the SQLite
    driver's executemany of plain tuples (several times faster than SQLAlchemy's per-row
    parameter processing), and SQLAlchemy's executemany elsewhere."""
    if uses_copy(connection):
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


def uses_copy(bind: Connection | Engine) -> bool:
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
