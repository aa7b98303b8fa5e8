"""`python -m bench.formats`: what HEIC and AVIF inputs cost beside JPEG, and what
COLOR_PROFILE=srgb saves, measured on the compress stage alone (no service, no network),
on one core.

1. Decode + encode per megapixel: the same generated photographs (bench's `photo`) saved
   as JPEG (quality 90), HEIC and AVIF (quality 80, as phones write them), each
   compressed by `compress_image` to the default output (JPEG, JPEG_QUALITY 50,
   optimized tables); the median of BENCH_FORMAT_RUNS runs, in ms a megapixel.
2. Output bytes with COLOR_PROFILE=srgb against keep: the same photograph tagged with
   each RGB ICC profile installed under /usr/share/color/icc (Debian's colord-data and
   icc-profiles-free), compressed both ways; the bytes each output saves.

BENCH_FORMAT_MP (default 4) sets the photographs' size, BENCH_FORMAT_RUNS (default 5)
the runs. Nothing is written; the figures are printed.
"""

import io
import random
import statistics
import time
from pathlib import Path

from PIL import ImageCms

from app.pipeline.compress import Encoding, compress_image
from bench.__main__ import env_int, photo, say

PROFILE_FOLDER = Path("/usr/share/color/icc")
INPUTS = {"JPEG": {"quality": 90}, "HEIF": {"quality": 80}, "AVIF": {"quality": 80}}


def encoded(image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def cost_per_megapixel(runs: int, megapixels: int) -> dict[str, float]:
    rng = random.Random(11)
    image = photo(rng, megapixels)
    pixels = image.width * image.height
    encoding = Encoding(50, optimize=True)
    figures = {}
    for fmt, params in INPUTS.items():
        data = encoded(image, fmt, **params)
        compress_image(data, encoding, max_pixels=10**9)  # codec libraries loaded
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            compress_image(data, encoding, max_pixels=10**9)
            times.append(time.perf_counter() - started)
        figures[fmt] = statistics.median(times) * 1000 / (pixels / 1e6)
        say(f"{fmt:5s} input {len(data) / pixels:.2f} bytes/px: {figures[fmt]:.1f} ms/MP (decode + encode)")
    return figures


def rgb_profiles() -> list[Path]:
    found = []
    for path in sorted(PROFILE_FOLDER.rglob("*.ic[cm]")):
        data = path.read_bytes()
        if data[16:20] == b"RGB " and data[12:16] in (b"mntr", b"scnr", b"spac"):
            found.append(path)
    return found


def srgb_savings(megapixels: float) -> list[tuple[str, int, int, int]]:
    image = photo(random.Random(12), megapixels)
    rows = []
    for path in rgb_profiles():
        icc = path.read_bytes()
        try:
            ImageCms.ImageCmsProfile(io.BytesIO(icc))
        except (ImageCms.PyCMSError, OSError):
            continue
        data = encoded(image, "JPEG", quality=90, icc_profile=icc)
        keep = compress_image(data, Encoding(50, optimize=True, color_profile="keep"), max_pixels=10**9)
        srgb = compress_image(data, Encoding(50, optimize=True, color_profile="srgb"), max_pixels=10**9)
        rows.append((path.name, len(icc), len(keep.data), len(srgb.data)))
        say(f"{path.name:34s} profile {len(icc):6d} B: keep {len(keep.data):7d} B, srgb {len(srgb.data):7d}")
    return rows


def measure() -> dict:
    """Both figures, printed as they come; `make bench` keeps them in its JSON."""
    megapixels = env_int("BENCH_FORMAT_MP", 4)
    runs = env_int("BENCH_FORMAT_RUNS", 5)
    say(f"decode + encode of a {megapixels} MP photograph to JPEG quality 50, median of {runs}")
    figures = cost_per_megapixel(runs, megapixels)
    for fmt in ("HEIF", "AVIF"):
        say(f"{fmt} costs {figures[fmt] / figures['JPEG']:.2f}x a JPEG input")
    result: dict = {"ms_per_megapixel": {fmt: round(ms, 1) for fmt, ms in figures.items()}}
    say("output bytes, COLOR_PROFILE=keep against srgb, a 1 MP photograph tagged with each profile")
    rows = srgb_savings(1)
    if rows:
        saved = sum(keep - srgb for _, _, keep, srgb in rows)
        total = sum(keep for _, _, keep, _ in rows)
        say(f"srgb saves {saved} B of {total} B over {len(rows)} images ({100 * saved / total:.1f}%)")
        result["srgb_saves"] = {"bytes": saved, "of_bytes": total, "images": len(rows)}
    else:
        say(f"no RGB profiles under {PROFILE_FOLDER}: apt-get install colord-data icc-profiles-free")
    return result


def main() -> None:
    measure()


if __name__ == "__main__":
    main()
