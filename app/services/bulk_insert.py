"""Inserting a batch's rows in bulk: ids reserved up front, COPY on PostgreSQL (psycopg2),
SQLAlchemy's executemany elsewhere. Only flushes; the caller owns the transaction."""

import io
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing

from sqlalchemy import Connection, Engine, Table, bindparam, func, insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app.db.models import Host, Image, ImageStatus
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


def numbered(rows: Iterable[tuple[int, str, str]], ids: Sequence[int]) -> Iterator[tuple[int, tuple]]:
    """(id, row) pairs; every row gets one (ids are at least as many as the rows)."""
    unused = iter(ids)
    for row in rows:
        yield next(unused), row


PRODUCT_INSERT_COLUMNS = ("id", "request_pk", "serial_number", "product_name")

IMAGE_INSERT_COLUMNS = ("request_pk", "product_id", "position", "input_url", "status", "attempts", "host")


def insert_images(
    connection: Connection,
    request_pk: int,
    numbered_rows: Iterable[tuple[int, tuple[int, str, str]]],
    hosts: set[str] | None = None,
) -> Counter[str]:
    """Insert the images of the rows as they come, each with its origin host (added to
    `hosts`); returns how many copies each repeated URL has. Rows are formatted while they
    are sent: on PostgreSQL the server inserts one part while this process formats the
    next, and no list of 300,000 tuples is built."""
    urls_value = _copy_urls_value if uses_copy(connection) else str
    pending, copy = ImageStatus.PENDING.value, ImageStatus.COPY.value
    seen: set[str] = set()
    copies: Counter[str] = Counter()
    hosts = set() if hosts is None else hosts

    def images() -> Iterator[tuple]:
        host_of = UrlHosts()
        last_host, host_value = None, ""
        for product_id, (_, _, urls) in numbered_rows:
            for position, url in enumerate(urls.split(URL_SEPARATOR)):
                status = pending
                if url in seen:
                    status = copy
                    copies[url] += 1
                else:
                    seen.add(url)
                host = host_of(url)
                if host is not last_host:
                    last_host, host_value = host, urls_value(host)
                    hosts.add(host)
                yield (request_pk, product_id, position, urls_value(url), status, 0, host_value)

    bulk_insert(connection, Image.__table__, IMAGE_INSERT_COLUMNS, images())
    return copies


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


def count_and_link_copies(connection: Connection, request_pk: int, copies: Counter[str]) -> None:
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
