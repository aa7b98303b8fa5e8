"""The memory estimate of each output encoder is an upper bound of what compressing takes,
measured as the peak RSS growth of a fresh worker-like process (C allocations included,
which tracemalloc cannot see)."""

import contextlib
import multiprocessing

import pytest
from PIL import Image

from app.pipeline.compress import Encoding, compress_image
from app.pipeline.options import avif_supported
from app.pipeline.stages import THUMBNAIL_LONG_SIDE
from tests.support import images

SIZE = (2400, 1800)
# Noise is the worst case for the WebP and AVIF encoders: their buffers grow with what
# they have to code (a photo-like image takes half as much at quality 90).
ENCODINGS = {
    "jpeg": dict(output_format="JPEG"),
    "jpeg_optimized": dict(output_format="JPEG", optimize=True),
    "jpeg_progressive": dict(output_format="JPEG", progressive=True),
    "webp": dict(output_format="WEBP"),
    "avif": dict(output_format="AVIF"),
}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:"))


def _measure_in_child(data: bytes, encoding: Encoding, answers) -> None:
    """Estimated and measured peak of one compress, thumbnail included, as the stage runs it."""
    from app.pipeline.compress import warm_up
    from app.pipeline.processes import _keep_image_memory_for_reuse

    _keep_image_memory_for_reuse()
    warm_up()
    # The encoder's library and first-use tables load here, not in the measured call.
    compress_image(images.jpeg((64, 48)), encoding, max_pixels=SIZE[0] * SIZE[1])
    figures = {}

    @contextlib.contextmanager
    def measure(cost_bytes: int):
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # the peak (VmHWM) starts again from the current RSS
        figures["estimate"], baseline = cost_bytes, _status_bytes("VmRSS")
        yield
        figures["used"] = _status_bytes("VmHWM") - baseline

    result = compress_image(
        data, encoding, max_pixels=SIZE[0] * SIZE[1], admission=measure, thumbnail_side=THUMBNAIL_LONG_SIDE
    )
    # The output's in-memory file is shared memory that RSS does not show; count it.
    answers.put((figures["estimate"], figures["used"] + len(result.data)))


def _noise_jpeg(size: tuple[int, int]) -> bytes:
    return images.encode(
        Image.merge("RGB", [Image.effect_noise(size, 60) for _ in range(3)]), "JPEG", quality=90
    )


@pytest.mark.slow
@pytest.mark.parametrize("quality", [10, 100])
@pytest.mark.parametrize("kind", ENCODINGS)
def test_the_estimate_is_an_upper_bound_for_each_output_format(kind, quality):
    if kind == "avif" and not avif_supported():
        pytest.skip("this Pillow cannot write AVIF")
    encoding = Encoding(quality, **ENCODINGS[kind])
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_measure_in_child, args=(_noise_jpeg(SIZE), encoding, answers))
    child.start()
    estimate, used = answers.get(timeout=120)
    child.join(10)
    pixels = SIZE[0] * SIZE[1]
    assert used <= estimate, (used / pixels, estimate / pixels)
    assert estimate <= 1.5 * used + 2 * pixels  # an upper bound, not a wild one
