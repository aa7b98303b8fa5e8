"""A CMYK ICC profile written byte by byte (ICC.1:2001-04, version 2): a printer profile
whose A2B0 table (lut16Type, 2 grid points an ink) gives the Lab of the paper and of every
solid overprint, so a test knows exactly which colour each ink value must show. Debian's
free profile packages hold RGB and grey profiles only."""

import struct

D50 = (0.9642, 1.0, 0.8249)


def _s15(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _lab16(lab: tuple[float, float, float]) -> bytes:
    """Lab in the version 2 16-bit encoding: L 0-100 to 0-0xFF00, a and b +128, times 256."""
    lightness, a, b = lab
    return struct.pack(">HHH", round(lightness * 652.8), round((a + 128) * 256), round((b + 128) * 256))


def _desc(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\x00"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)


def _a2b0(corners: dict[tuple[int, int, int, int], tuple[float, float, float]]) -> bytes:
    table = b"mft2" + bytes(4) + bytes([4, 3, 2, 0])
    table += b"".join(_s15(v) for v in (1, 0, 0, 0, 1, 0, 0, 0, 1))  # identity matrix
    table += struct.pack(">HH", 2, 2)
    table += struct.pack(">HH", 0, 65535) * 4  # linear input curves
    # The grid: the first input channel (C) varies slowest.
    for c in (0, 1):
        for m in (0, 1):
            for y in (0, 1):
                for k in (0, 1):
                    table += _lab16(corners[(c, m, y, k)])
    table += struct.pack(">HH", 0, 65535) * 3  # linear output curves
    return table


def cmyk_profile(corners: dict[tuple[int, int, int, int], tuple[float, float, float]], name: str) -> bytes:
    """The profile; `corners` maps each (c, m, y, k) in {0, 1} to its Lab (D50)."""
    tags = [
        (b"desc", _desc(name)),
        (b"cprt", b"text" + bytes(4) + b"No copyright, test data\x00"),
        (b"wtpt", b"XYZ " + bytes(4) + b"".join(_s15(v) for v in D50)),
        (b"A2B0", _a2b0(corners)),
    ]
    offset = 128 + 4 + 12 * len(tags)
    directory, body = struct.pack(">I", len(tags)), b""
    for signature, data in tags:
        data += bytes(-len(data) % 4)
        directory += signature + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = struct.pack(">I", size) + b"lcms" + bytes([2, 0x10, 0, 0]) + b"prtrCMYKLab "
    header += struct.pack(">6H", 2026, 1, 1, 0, 0, 0) + b"acsp" + bytes(4) + bytes(4 + 4 + 4 + 8)
    header += struct.pack(">I", 1) + b"".join(_s15(v) for v in D50) + b"lcms"
    header += bytes(128 - len(header))
    return header + directory + body
