"""What the first bytes of an input say, before any decoder sees it.

`sniffed_format` names the format an input claims to be by its signature, so that a
truncated or damaged file of a supported format fails as `corrupt_image` rather than
`not_an_image`. `isobmff_declared_pixels` reads the sizes a HEIF or AVIF file declares
for its items (`ispe` properties: the image, a grid's whole canvas, its tiles, its
thumbnails) without decoding: the pixel limit applies to the largest before libheif or
libavif allocate anything for it.
"""

import struct

# ftyp brands of the HEIF family (ISO/IEC 23008-12) and of AVIF.
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Boxes that hold other boxes on the way to the item properties; meta is a full box.
_CONTAINERS = {b"meta": 4, b"iprp": 0, b"ipco": 0}
_MAX_BOXES = 10_000


def _ftyp_brands(data: bytes) -> set[bytes]:
    if len(data) < 16 or data[4:8] != b"ftyp":
        return set()
    size = min(struct.unpack(">I", data[:4])[0], len(data))
    return {data[8:12]} | {data[offset : offset + 4] for offset in range(16, size - 3, 4)}


def sniffed_format(data: bytes) -> str | None:
    """Pillow's name of the format the signature claims, or None."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    brands = _ftyp_brands(bytes(data[:1024]))
    if not brands:
        return None
    major = bytes(data[8:12])
    # The major brand first: an AVIF names the general HEIF brand mif1 among the others.
    if major in AVIF_BRANDS:
        return "AVIF"
    if major in HEIF_BRANDS:
        return "HEIF"
    if brands & AVIF_BRANDS:
        return "AVIF"
    return "HEIF" if brands & HEIF_BRANDS else None


def _boxes(data: memoryview, start: int, end: int):
    position = start
    while position + 8 <= end:
        size, kind = struct.unpack(">I4s", data[position : position + 8])
        header = 8
        if size == 1:
            if position + 16 > end:
                return
            size = struct.unpack(">Q", data[position + 8 : position + 16])[0]
            header = 16
        elif size == 0:
            size = end - position
        if size < header:
            return
        yield kind, position + header, min(position + size, end)
        position += size


def isobmff_declared_pixels(data: bytes) -> tuple[int, int] | None:
    """The largest (width, height) any `ispe` in the file's meta box declares, or None
    when there is none (not an ISOBMFF image, or one too damaged to say)."""
    view = memoryview(data)
    largest: tuple[int, int] | None = None
    pending = [(0, len(view))]
    seen = 0
    while pending and seen < _MAX_BOXES:
        start, end = pending.pop()
        for kind, body, box_end in _boxes(view, start, end):
            seen += 1
            if kind in _CONTAINERS:
                pending.append((body + _CONTAINERS[kind], box_end))
            elif kind == b"ispe" and box_end - body >= 12:
                width, height = struct.unpack(">II", view[body + 4 : body + 12])
                if largest is None or width * height > largest[0] * largest[1]:
                    largest = (width, height)
    return largest
