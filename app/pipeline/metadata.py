"""What metadata an output may carry (METADATA), and removing the rest from a kept
original without touching its pixels.

Outputs are published at public URLs, so what a camera or phone writes beside the pixels
(GPS position, serial numbers, maker notes, XMP, comments, an EXIF thumbnail that may
show the uncropped picture) is never passed on. `METADATA=copyright` (the default, as
imgproxy's KEEP_COPYRIGHT) keeps the EXIF Copyright and Artist fields, in an EXIF block
of their own; `METADATA=none` keeps nothing. Orientation is never written: outputs carry
upright pixels.

A kept original (keep_smaller) is rewritten segment by segment, never re-encoded:
- JPEG: every APPn and COM segment goes but APP0 (JFIF), APP14 (Adobe: says how the
  components are coded) and, when colour profiles are kept, APP2 ICC_PROFILE; the
  published EXIF block is written as a new APP1.
- WebP: the EXIF and XMP chunks go (and ICCP unless profiles are kept), the VP8X flags
  follow; the published EXIF becomes an EXIF chunk (a simple-format file gets a VP8X
  header for it).
Other formats are never kept with metadata in them (app/pipeline/compress.py).
"""

import struct

from PIL import ExifTags, Image

METADATA_POLICIES = ("copyright", "none")
PUBLISHED_EXIF_TAGS = (ExifTags.Base.Copyright, ExifTags.Base.Artist)
EXIF_HEADER = b"Exif\x00\x00"


class NotStrippable(ValueError):
    """The original's structure is not one this module rewrites; it is re-encoded instead."""


def published_exif(exif: Image.Exif | None, policy: str) -> bytes:
    """The EXIF block (with its "Exif\\0\\0" header) an output carries under `policy`:
    b"" when there is nothing to publish."""
    if policy != "copyright" or exif is None:
        return b""
    kept = []
    for tag in sorted(PUBLISHED_EXIF_TAGS):
        value = exif.get(tag)
        # Pillow reads ASCII fields as latin-1: encoding back gives the bytes as stored,
        # UTF-8 included (many tools write it there), which Pillow's writer would replace.
        raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
        if isinstance(raw, bytes) and raw.strip(b"\x00 "):
            kept.append((tag, raw.rstrip(b"\x00")))
    return _ascii_exif(kept) if kept else b""


def _ascii_exif(entries: list[tuple[int, bytes]]) -> bytes:
    """An EXIF block of one IFD holding these ASCII fields (tags in ascending order)."""
    values_at = 8 + 2 + 12 * len(entries) + 4  # after the TIFF header and the IFD
    ifd, values = struct.pack(">H", len(entries)), b""
    for tag, raw in entries:
        raw += b"\x00"
        if len(raw) <= 4:
            ifd += struct.pack(">HHI", tag, 2, len(raw)) + raw.ljust(4, b"\x00")
        else:
            ifd += struct.pack(">HHII", tag, 2, len(raw), values_at + len(values))
            values += raw + b"\x00" * (len(raw) & 1)  # each value starts on a word boundary
    return EXIF_HEADER + b"MM\x00*" + struct.pack(">I", 8) + ifd + b"\x00\x00\x00\x00" + values


# -- JPEG -------------------------------------------------------------------------------

SOI, EOI, SOS = 0xD8, 0xD9, 0xDA
APP0, APP1, APP2, APP14, COM = 0xE0, 0xE1, 0xE2, 0xEE, 0xFE
# Markers that stand alone, without a length: SOI, EOI, RST0-7, TEM.
_STANDALONE = {SOI, EOI, 0x01, *range(0xD0, 0xD8)}


def _jpeg_segments(data: bytes):
    """(marker, segment bytes) from SOI to EOI; entropy-coded data after each SOS rides
    with that SOS segment."""
    data = bytes(data)
    if data[:2] != b"\xff\xd8":
        raise NotStrippable("not a JPEG")
    position = 2
    yield SOI, data[:2]
    end = len(data)
    while position < end:
        if data[position] != 0xFF:
            raise NotStrippable(f"no marker at byte {position}")
        while position + 1 < end and data[position + 1] == 0xFF:  # fill bytes
            position += 1
        if position + 1 >= end:
            raise NotStrippable("the file ends inside a marker")
        marker = data[position + 1]
        if marker in _STANDALONE:
            yield marker, data[position : position + 2]
            position += 2
            if marker == EOI:
                # Whatever follows is dropped: phones append more JPEGs there (MPF
                # previews, depth maps), each with metadata of its own.
                return
            continue
        if position + 4 > end:
            raise NotStrippable("the file ends inside a segment header")
        length = struct.unpack(">H", data[position + 2 : position + 4])[0]
        segment_end = position + 2 + length
        if length < 2 or segment_end > end:
            raise NotStrippable(f"a segment at byte {position} runs past the end")
        if marker == SOS:
            # Scan data runs to the next marker other than a stuffed 0xFF00 or RSTn.
            scan = segment_end
            while True:
                scan = data.find(b"\xff", scan)
                if scan < 0 or scan + 1 >= end:
                    raise NotStrippable("the scan data has no end")
                following = data[scan + 1]
                if following == 0 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    scan += 1 if following == 0xFF else 2
                    continue
                break
            segment_end = scan
        yield marker, data[position:segment_end]
        position = segment_end
    raise NotStrippable("the file has no end-of-image marker")


def _keeps_jpeg_segment(marker: int, segment: bytes, keep_icc: bool) -> bool:
    if marker in (APP0, APP14):
        return True
    if marker == APP2:
        return keep_icc and segment[4:16] == b"ICC_PROFILE\x00"
    return not (0xE0 <= marker <= 0xEF or marker == COM)


def strip_jpeg(data: bytes, exif: bytes, *, keep_icc: bool) -> bytes:
    """The JPEG with its metadata segments removed and `exif` (if any) written in their
    place; the compressed image data is copied byte for byte."""
    segments = list(_jpeg_segments(bytes(data)))
    out = [segments[0][1]]
    rest = segments[1:]
    # JFIF, when present, stays first, as its specification requires.
    if rest and rest[0][0] == APP0:
        out.append(rest[0][1])
        rest = rest[1:]
    if exif:
        out.append(b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif)
    out.extend(segment for marker, segment in rest if _keeps_jpeg_segment(marker, segment, keep_icc))
    return b"".join(out)


# -- WebP -------------------------------------------------------------------------------

VP8X_ICC, VP8X_ALPHA, VP8X_EXIF, VP8X_XMP, VP8X_ANIMATION = 0x20, 0x10, 0x08, 0x04, 0x02


def _webp_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise NotStrippable("not a WebP")
    riff_end = min(len(data), 8 + struct.unpack("<I", data[4:8])[0])
    chunks = []
    position = 12
    while position + 8 <= riff_end:
        fourcc = data[position : position + 4]
        size = struct.unpack("<I", data[position + 4 : position + 8])[0]
        body_end = position + 8 + size
        if body_end > riff_end:
            raise NotStrippable(f"the {fourcc!r} chunk runs past the end")
        chunks.append((fourcc, data[position + 8 : body_end]))
        position = body_end + (size & 1)
    return chunks


def _webp_chunk(fourcc: bytes, body: bytes) -> bytes:
    return fourcc + struct.pack("<I", len(body)) + body + (b"\x00" if len(body) & 1 else b"")


def strip_webp(data: bytes, exif: bytes, *, keep_icc: bool, size: tuple[int, int]) -> bytes:
    """The WebP without EXIF and XMP chunks (and ICCP unless keep_icc), with `exif` as its
    EXIF chunk if given; the VP8/VP8L/ALPH chunks are copied byte for byte."""
    chunks = [
        (fourcc, body)
        for fourcc, body in _webp_chunks(bytes(data))
        if fourcc not in (b"EXIF", b"XMP ") and (keep_icc or fourcc != b"ICCP")
    ]
    tiff = exif.removeprefix(EXIF_HEADER)
    if chunks and chunks[0][0] == b"VP8X":
        flags = chunks[0][1][0] & ~(VP8X_EXIF | VP8X_XMP)
        if not any(fourcc == b"ICCP" for fourcc, _ in chunks):
            flags &= ~VP8X_ICC
        header, chunks = chunks[0][1], chunks[1:]
    elif tiff:
        flags = 0
        width, height = size
        header = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    else:
        header = None
    body = b""
    if header is not None:
        flags |= VP8X_EXIF if tiff else 0
        body += _webp_chunk(b"VP8X", bytes([flags]) + header[1:])
    body += b"".join(_webp_chunk(fourcc, chunk) for fourcc, chunk in chunks)
    if tiff:
        body += _webp_chunk(b"EXIF", tiff)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body


def strip_original(
    data: bytes, source_format: str, exif: bytes, *, keep_icc: bool, size: tuple[int, int]
) -> bytes:
    """The original with only the published metadata; NotStrippable if it cannot be
    rewritten losslessly (then it is not kept)."""
    if source_format == "JPEG":
        return strip_jpeg(data, exif, keep_icc=keep_icc)
    if source_format == "WEBP":
        return strip_webp(data, exif, keep_icc=keep_icc, size=size)
    raise NotStrippable(f"{source_format} originals are not rewritten")
