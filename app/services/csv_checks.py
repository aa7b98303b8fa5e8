"""An uploaded CSV read and checked row by row, within the limits of an upload."""

import marshal
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import BinaryIO

from app.errors import InvalidCsv, PayloadTooLarge
from app.services.csv_input import (
    CsvErrors,
    CsvTooLarge,
    read_products,
)


@dataclass(frozen=True)
class CsvLimits:
    max_bytes: int
    max_line_bytes: int
    max_rows: int
    max_urls_per_row: int


# Checked URLs hold no whitespace, so a newline can separate them.
URL_SEPARATOR = "\n"


class CheckedRows:
    """An uploaded CSV's rows as they are read and checked, each (serial number, product
    name, image URLs joined by URL_SEPARATOR): one string per row rather than one per URL.
    Nothing is kept: a caller that stores the rows as they come holds at most a chunk of
    them, whatever the size of the file.

    Iterating yields the good rows up to the first problem, then reads on without yielding
    to find every problem; raise_problems() then raises InvalidCsv listing them, or
    PayloadTooLarge. `row_count` and `total_images` count the rows yielded."""

    def __init__(self, csv_file: BinaryIO, limits: CsvLimits):
        self.limits = limits
        self.errors = CsvErrors()
        self.too_large = False
        self.row_count = 0
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
                self.row_count += 1
                self.total_images += len(product.image_urls)
                yield (product.serial_number, product.product_name, URL_SEPARATOR.join(product.image_urls))
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


def check_csv(csv_file: BinaryIO, limits: CsvLimits, spool: BinaryIO | None = None) -> "SpooledRows":
    """Read and check the whole CSV, touching no database; raises InvalidCsv listing every
    problem found, or PayloadTooLarge. Returns the good rows, spooled to `spool` (else a
    temporary file) for the pass that stores them (reading them back costs a tenth of
    parsing the CSV again; memory holds one chunk)."""
    checked = CheckedRows(csv_file, limits)
    spooled = SpooledRows(checked, spool)
    checked.raise_problems()
    spooled.row_count, spooled.total_images = checked.row_count, checked.total_images
    return spooled


class SpooledRows:
    """Rows written to a file (by default a temporary one) as they come, a marshal record
    of CHUNK_ROWS rows each, after its length: iterate them to store them. Memory holds a
    chunk; a temporary file is closed when collected."""

    CHUNK_ROWS = 5000

    def __init__(self, rows: Iterable[tuple[int, str, str]], file: BinaryIO | None = None) -> None:
        self.file = file if file is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.row_count = 0
        self.total_images = 0
        rows = iter(rows)
        while chunk := list(islice(rows, self.CHUNK_ROWS)):
            record = marshal.dumps(chunk)
            self.file.write(len(record).to_bytes(8, "little"))
            self.file.write(record)
            del chunk, record  # before the next chunk is read: one chunk at a time

    @classmethod
    def reopen(cls, file: BinaryIO) -> "SpooledRows":
        """The rows an earlier SpooledRows wrote to `file` (e.g. before a restart)."""
        return cls((), file)  # no rows more: writes nothing

    def __iter__(self) -> Iterator[tuple[int, str, str]]:
        self.file.seek(0)
        while size := self.file.read(8):
            yield from marshal.loads(self.file.read(int.from_bytes(size, "little")))

    def raise_problems(self) -> None:
        """None: check_csv has raised them already."""


def most_rows(csv_file: BinaryIO, limits: CsvLimits) -> int:
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
