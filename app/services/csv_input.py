"""Reading an uploaded products CSV: tolerant of harmless variation, strict about the rest.

Rows are yielded as they are read, so a large file never sits in memory whole; problems
are collected in `errors` (bounded) and the caller refuses the upload if any were found.
"""

import csv
import re
from array import array
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, NamedTuple

from app.net.urls import URL_LIST_SEPARATORS, url_list_is_fine, url_problem

COLUMNS = ("S. No.", "Product Name", "Input Image Urls")
OUTPUT_COLUMNS = (*COLUMNS, "Output Image Urls")
MAX_REPORTED_ERRORS = 50
MAX_PRODUCT_NAME_CHARS = 1000
READ_BLOCK_BYTES = 64 * 1024
_LINE_BREAKS = (b"\n", b"\r")
# Inside the URL cell, URLs may be separated by commas, semicolons or any whitespace
# (newlines too). A URL holding a raw comma or semicolon must percent-encode it.
_URL_SEPARATORS = re.compile(URL_LIST_SEPARATORS + "+")
_LOOKS_LIKE_URL = re.compile(r"\s*https?://", re.IGNORECASE)


def _header_key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


_COLUMN_BY_KEY = {_header_key(name): name for name in COLUMNS}
_COLUMN_BY_KEY["serialnumber"] = "S. No."


class CsvTooLarge(Exception):
    pass


class CsvRow(NamedTuple):  # not a frozen dataclass: one is made per row, and this is faster
    line: int
    serial_number: int
    product_name: str
    image_urls: list[str]


@dataclass
class CsvErrors:
    items: list[dict] = field(default_factory=list)
    total: int = 0

    def add(self, line: int | None, column: str | None, message: str) -> None:
        self.total += 1
        if len(self.items) < MAX_REPORTED_ERRORS:
            self.items.append({"line": line, "column": column, "message": message})

    def __bool__(self) -> bool:
        return self.total > 0

    @property
    def not_shown(self) -> int:
        return self.total - len(self.items)


def _decoded_lines(
    stream: BinaryIO,
    *,
    max_bytes: int,
    max_line_bytes: int,
    errors: CsvErrors,
    block_bytes: int = READ_BLOCK_BYTES,
) -> Iterator[str]:
    """Yield the text lines, line breaks included, of a UTF-8 (optionally BOM-prefixed)
    byte stream of at most max_bytes; a line longer than max_line_bytes ends the file.

    Lines are split on bytes (in UTF-8 a CR or LF byte is always that character) and every
    byte is copied a bounded number of times, so the time is linear in the size however
    long the lines are.
    """
    seen = 0
    line_number = 0
    unfinished: list[bytes] = []  # the start of a line that goes on in the next block
    unfinished_bytes = 0
    carry = b""
    while True:
        read = stream.read(block_bytes)
        seen += len(read)
        block = carry + read if carry else read
        carry = b""
        if read and block.endswith(b"\r"):
            # A CR LF may be split between blocks: one byte more decides.
            carry = stream.read(1)
            seen += len(carry)
            if carry == b"\n":
                block += carry
                carry = b""
        if seen > max_bytes:
            raise CsvTooLarge
        if b"\x00" in block:
            errors.add(None, None, "the file is binary, not a CSV text file")
            return
        lines = block.splitlines(keepends=True)
        if not lines:
            lines = [b"".join(unfinished)] if unfinished else []
            unfinished = []
        elif unfinished and lines[0].endswith(_LINE_BREAKS):
            lines[0] = b"".join([*unfinished, lines[0]])
            unfinished = []
            unfinished_bytes = 0
        if block and not lines[-1].endswith(_LINE_BREAKS):
            tail = lines.pop()
            unfinished.append(tail)
            unfinished_bytes += len(tail)
        for line in lines:
            line_number += 1
            if len(line) > max_line_bytes and len(line.rstrip(b"\r\n")) > max_line_bytes:
                errors.add(line_number, None, f"the line is longer than {max_line_bytes} bytes")
                return
            try:
                text = line.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError:
                errors.add(line_number, None, "the file is not valid UTF-8 text")
                return
            yield text
        if unfinished_bytes > max_line_bytes:
            errors.add(line_number + 1, None, f"the line is longer than {max_line_bytes} bytes")
            return
        if not block:
            return


def read_products(
    stream: BinaryIO,
    *,
    max_bytes: int,
    max_line_bytes: int,
    max_rows: int,
    max_urls_per_row: int,
    errors: CsvErrors,
) -> Iterator[CsvRow]:
    """Yield valid rows; record every problem in errors. Raises CsvTooLarge past max_bytes."""
    lines = _decoded_lines(stream, max_bytes=max_bytes, max_line_bytes=max_line_bytes, errors=errors)
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
    except csv.Error as exc:
        errors.add(reader.line_num, None, f"the header cannot be parsed: {exc}")
        return
    if header is None:
        if not errors:
            errors.add(None, None, "the file is empty; expected a header: " + ",".join(COLUMNS))
        return
    columns = [_COLUMN_BY_KEY.get(_header_key(name)) for name in header]
    unknown = [name.strip() for name, column in zip(header, columns, strict=True) if column is None]
    missing = [name for name in COLUMNS if name not in columns]
    if unknown or missing or len(header) != len(COLUMNS):
        problems = []
        if missing:
            problems.append("missing column(s): " + ", ".join(missing))
        if unknown:
            problems.append("unknown column(s): " + ", ".join(repr(name) for name in unknown))
        if not problems:
            problems.append("a column appears twice")
        errors.add(
            reader.line_num,
            None,
            "; ".join(problems) + ". Expected: " + ",".join(COLUMNS),
        )
        return
    index = {column: position for position, column in enumerate(columns)}

    serials = SerialNumbers()
    rows = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.add(reader.line_num, None, f"the row cannot be parsed: {exc}")
            return
        line = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        rows += 1
        if rows > max_rows:
            errors.add(line, None, f"the file has more than {max_rows} product rows")
            return
        if len(cells) != len(COLUMNS):
            cells = _unquoted_url_list(line, cells, index, errors)
            if cells is None:
                continue
        row = _parse_row(line, cells, index, max_urls_per_row, serials, errors)
        if row is not None:
            yield row
    if rows == 0 and not errors:
        errors.add(None, None, "the file has a header but no product rows")


def _unquoted_url_list(line: int, cells: list[str], index: dict, errors: CsvErrors) -> list[str] | None:
    """A row with more cells than columns, as spreadsheets export an unquoted URL list
    (`1,SKU1,https://a.jpg,https://b.jpg`): when the URL column is the last one and every
    extra cell is a URL (or empty), they are more URLs of that cell. None, with the
    problem recorded, for anything else."""
    urls_last = index["Input Image Urls"] == len(COLUMNS) - 1
    if len(cells) < len(COLUMNS) or not urls_last:
        errors.add(line, None, f"expected {len(COLUMNS)} columns, found {len(cells)}")
        return None
    for position in range(len(COLUMNS), len(cells)):
        cell = cells[position]
        if cell.strip() and not _LOOKS_LIKE_URL.match(cell):
            errors.add(
                line,
                f"column {position + 1}",
                f"expected {len(COLUMNS)} columns, found {len(cells)}; an extra column is "
                f"accepted only as more image URLs, and {cell.strip()[:60]!r} is not a URL",
            )
            return None
    return [*cells[: len(COLUMNS) - 1], ",".join(cells[len(COLUMNS) - 1 :])]


class SerialNumbers:
    """The serial numbers seen so far, in about 4 bytes each when they come in increasing
    order, as catalogues number their rows (a set costs about 70 bytes a number: 70 MB
    for a million rows): increasing numbers go to an array, searched by bisection; only
    those that come out of order go to a set."""

    def __init__(self):
        self._increasing = array("i")
        self._out_of_order: set[int] = set()
        self._largest = 0

    def add(self, serial: int) -> bool:
        """Remember serial; False if it was seen already."""
        if serial > self._largest:
            self._increasing.append(serial)
            self._largest = serial
            return True
        if serial in self._out_of_order:
            return False
        at = bisect_left(self._increasing, serial)
        if at < len(self._increasing) and self._increasing[at] == serial:
            return False
        self._out_of_order.add(serial)
        return True


def _parse_row(line, cells, index, max_urls_per_row, serials, errors) -> CsvRow | None:
    ok = True
    raw_serial = cells[index["S. No."]].strip()
    serial = int(raw_serial) if raw_serial.isdigit() and raw_serial.isascii() else 0
    if serial <= 0 or serial >= 2**31:
        errors.add(line, "S. No.", f"{raw_serial[:40]!r} is not a positive whole number")
        ok = False
    elif not serials.add(serial):
        errors.add(line, "S. No.", f"serial number {serial} appears more than once")
        ok = False

    name = cells[index["Product Name"]].strip()
    if not name:
        errors.add(line, "Product Name", "the product name is empty")
        ok = False
    elif len(name) > MAX_PRODUCT_NAME_CHARS:
        errors.add(line, "Product Name", f"longer than {MAX_PRODUCT_NAME_CHARS} characters")
        ok = False

    url_cell = cells[index["Input Image Urls"]]
    words = url_cell.split()
    if len(words) == 1 and ";" not in url_cell:  # the common case, without a regex
        urls = [url for url in words[0].split(",") if url]
    else:
        urls = [url for url in _URL_SEPARATORS.split(url_cell) if url]
    if not urls:
        errors.add(line, "Input Image Urls", "no image URLs")
        ok = False
    elif len(urls) > max_urls_per_row:
        errors.add(
            line,
            "Input Image Urls",
            f"{len(urls)} URLs; at most {max_urls_per_row} per row",
        )
        ok = False
    if not url_list_is_fine(urls, url_cell):
        for url in urls:
            problem = url_problem(url)
            if problem:
                errors.add(line, "Input Image Urls", problem)
                ok = False
    return CsvRow(line, serial, name, urls) if ok else None


# What spreadsheets read as the start of a formula (OWASP, "CSV injection").
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def neutralised(cell: str) -> str:
    """The cell as a spreadsheet will show it as text rather than run it: prefixed with '
    if it starts like a formula."""
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell
