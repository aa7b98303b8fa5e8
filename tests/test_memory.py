"""The memory budget per worker: decodes are admitted by their cost estimated from the
header, so concurrent large images wait rather than add up past the budget."""

import contextlib
import io
import multiprocessing
import threading
import time

import pytest
from PIL import Image

from app.ledger.units import WorkUnit
from app.pipeline.compress import compress_to_jpeg  # registers the HEIF plugin
from app.pipeline.failures import OverMemoryBudget
from app.pipeline.memory import MIB, MemoryBudget
from app.pipeline.stages import ImageStages, StageConfig
from app.storage import StorageConfig
from tests.support import images

# What the measured process may hold beyond the reservations: the downloads (a few
# hundred KB each), thread stacks, the allocator's slack.
RSS_MARGIN_BYTES = 64 * MIB


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def _reset_peak_rss() -> int:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak (VmHWM) starts again from the current RSS
    return _current_rss_bytes()


def _stages_in_child(config: StageConfig, units: list[WorkUnit], answers) -> None:
    """Runs the units at once, on threads, through ImageStages the way a worker process
    does (same allocator settings), and reports outcomes and memory."""
    from app.pipeline.compress import warm_up
    from app.pipeline.processes import _keep_image_memory_for_reuse

    _keep_image_memory_for_reuse()
    stages = ImageStages.from_config(config)
    warm_up()
    baseline = _reset_peak_rss()
    outcomes = [None] * len(units)

    def run(index: int) -> None:
        outcomes[index] = stages.run(units[index])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(units))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers.put(
        {
            "codes": [outcome.error_code for outcome in outcomes],
            "messages": [outcome.error_message for outcome in outcomes],
            "peak_reserved": stages.memory.peak_reserved_bytes,
            "reserved_after": stages.memory.reserved_bytes,
            "rss_growth": _peak_rss_bytes() - baseline,
        }
    )
    stages.close()


def _config(tmp_path, image_server, *, budget_bytes: int, threads: int) -> StageConfig:
    return StageConfig(
        allow_private_hosts=f"127.0.0.1:{image_server.port}",
        download_timeout_seconds=30,
        max_image_bytes=128 * MIB,
        jpeg_quality=50,
        max_image_pixels=100_000_000,
        storage=StorageConfig(backend="local", media_root=tmp_path),
        downloads=threads,
        compress_slots=threads,  # cores do not limit these tests: memory must
        memory_budget_bytes=budget_bytes,
    )


def _opened_cost(data: bytes) -> int:
    costs = []

    def refuse(cost_bytes: int):
        costs.append(cost_bytes)
        raise OverMemoryBudget("measuring only")

    with pytest.raises(OverMemoryBudget):
        compress_to_jpeg(data, quality=50, max_pixels=100_000_000, admission=refuse)
    return costs[0]


@pytest.mark.slow
def test_concurrent_90_mp_images_stay_within_the_memory_budget(tmp_path, image_server):
    data = images.flat_png(10_000, 9_000)  # RGBA: decoded, then flattened onto white
    cost = _opened_cost(data)
    budget = 2 * cost + MIB  # room for two of the four at once
    units = [
        WorkUnit(n, 1, 1, "memory-budget", image_server.add(data, content_type="image/png")) for n in range(4)
    ]
    config = _config(tmp_path, image_server, budget_bytes=budget, threads=len(units))
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_stages_in_child, args=(config, units, answers))
    child.start()
    report = answers.get(timeout=300)
    child.join(30)

    assert report["codes"] == [None] * 4, report["messages"]
    print(f"cost {cost / MIB:.0f} MB, budget {budget / MIB:.0f} MB, used {report['rss_growth'] / MIB:.0f} MB")
    assert report["rss_growth"] <= budget + RSS_MARGIN_BYTES
    assert cost <= report["peak_reserved"] <= budget
    assert report["reserved_after"] == 0


def _measure_compress_in_child(data: bytes, answers) -> None:
    """Estimated and measured peak of compressing `data` in a fresh worker-like process."""
    from app.pipeline.compress import warm_up
    from app.pipeline.processes import _keep_image_memory_for_reuse

    _keep_image_memory_for_reuse()
    warm_up()
    figures = {}

    @contextlib.contextmanager
    def measure(cost_bytes: int):
        figures["estimate"], baseline = cost_bytes, _reset_peak_rss()
        yield
        figures["used"] = _peak_rss_bytes() - baseline

    result = compress_to_jpeg(data, quality=50, max_pixels=100_000_000, admission=measure)
    # The JPEG's in-memory file is shared memory that RSS does not show; count it.
    answers.put((figures["estimate"], figures["used"] + len(result.data)))


def _exif_rotated(orientation: int = 6) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


SIZE = (2400, 1800)
MODES = {
    "jpeg_rgb_rotated": lambda: images.encode(images.photo_like(SIZE), "JPEG", exif=_exif_rotated()),
    "jpeg_progressive": lambda: images.encode(
        images.photo_like(SIZE), "JPEG", progressive=True, subsampling=0
    ),
    "jpeg_cmyk": lambda: images.encode(images.photo_like(SIZE, "CMYK"), "JPEG"),
    "png_rgba": lambda: images.flat_png(*SIZE),
    "png_16_bit": lambda: images.flat_png(*SIZE, mode="I;16"),
    "png_palette_transparent": lambda: images.encode(
        images.photo_like(SIZE).convert("P"), "PNG", transparency=0
    ),
    "webp_rotated": lambda: images.encode(images.photo_like(SIZE), "WEBP", exif=_exif_rotated()),
    "tiff_32_bit": lambda: images.encode(Image.new("I", SIZE, 70_000), "TIFF"),
    "heic": lambda: images.encode(images.photo_like(SIZE), "HEIF", quality=80),
    "heic_rotated": lambda: images.encode(images.photo_like(SIZE), "HEIF", quality=80, exif=_exif_rotated()),
    "heic_rgba": lambda: images.encode(images.photo_like(SIZE, "RGBA"), "HEIF", quality=80),
    "avif": lambda: images.encode(images.photo_like(SIZE), "AVIF", quality=80),
    "avif_rotated": lambda: images.encode(images.photo_like(SIZE), "AVIF", quality=80, exif=_exif_rotated()),
    "avif_444": lambda: images.encode(images.photo_like(SIZE), "AVIF", quality=80, subsampling="4:4:4"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", MODES)
def test_the_estimate_is_an_upper_bound_of_the_memory_used(kind):
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_measure_compress_in_child, args=(MODES[kind](), answers))
    child.start()
    estimate, used = answers.get(timeout=60)
    child.join(10)
    pixels = SIZE[0] * SIZE[1]
    assert used <= estimate, (used / pixels, estimate / pixels)
    assert estimate <= 1.5 * used + 2 * pixels  # an upper bound, not a wild one


def test_an_image_over_the_whole_budget_fails_at_once_without_decoding(tmp_path, image_server):
    # A header claiming 90 MP with no pixel data: decoding it would fail as corrupt_image.
    url = image_server.add(images.png_claiming_size(10_000, 9_000), content_type="image/png")
    stages = ImageStages.from_config(_config(tmp_path, image_server, budget_bytes=128 * MIB, threads=1))
    try:
        started = time.monotonic()
        outcome = stages.run(WorkUnit(1, 1, 1, "memory-budget", url))
    finally:
        stages.close()
    assert outcome.error_code == "over_memory_budget"
    assert "WORKER_MEMORY_MB" in outcome.error_message and "128 MB" in outcome.error_message
    assert stages.memory.peak_reserved_bytes == 0
    assert time.monotonic() - started < 5


def test_admission_is_first_come_first_served():
    budget = MemoryBudget(100)
    admitted: list[str] = []

    def reserve(name: str, cost: int) -> None:
        with budget.reserve(cost):
            admitted.append(name)

    with budget.reserve(60):  # a decode in progress
        big = threading.Thread(target=reserve, args=("big", 100))
        big.start()
        while not budget._queue:  # the big image is in line
            time.sleep(0.001)
        small = threading.Thread(target=reserve, args=("small", 10))
        small.start()
        deadline = time.monotonic() + 5
        while len(budget._queue) < 2 and not admitted:  # the small one in line, or through
            assert time.monotonic() < deadline
            time.sleep(0.001)
        # 60 + 10 would fit, but the small image arrived after the big one.
        assert admitted == [] and len(budget._queue) == 2
    big.join(5)
    small.join(5)
    assert admitted == ["big", "small"]
    assert budget.peak_reserved_bytes == 100 and budget.reserved_bytes == 0


def test_small_images_are_admitted_without_waiting():
    budget = MemoryBudget(100 * MIB)
    data = images.jpeg((320, 240))
    result = compress_to_jpeg(data, quality=50, max_pixels=100_000_000, admission=budget.reserve)
    assert Image.open(io.BytesIO(result.data)).size == (320, 240)
    assert 0 < budget.peak_reserved_bytes < MIB and budget.reserved_bytes == 0
