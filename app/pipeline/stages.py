"""The stage chain for one image, with no database access: fetch -> compress -> store.

`ImageStages.run(unit)` turns a claimed WorkUnit into an ImageOutcome; whatever fails
fails that image alone, with a typed failure code, or, for a transient failure (see
app/pipeline/failures.py), sends it back to wait and be tried again (`retry_later`). It
runs on threads in the web process or inside the image worker processes
(app/pipeline/processes.py), which build their own copy from a StageConfig.

A re-import (a unit with a Revalidation that names an output stored for its encoding)
asks the origin whether the image changed; on a 304, or on bytes that hash the same, the
stored output and its thumbnail are copied under this request's keys and nothing is
decoded or encoded. If they are gone (their request was deleted), the image is encoded
as usual.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from app.ledger.units import ImageOutcome, OutputOptions, StoredOutput, WorkUnit
from app.net.guard import AddressPolicy, guarded_pool, parse_allowlist
from app.pipeline.compress import Encoding, compress_image
from app.pipeline.decoding import DecodingSlots
from app.pipeline.failures import FetchFailure, ImageFailure
from app.pipeline.fetch import FetchedImage, HttpFetcher
from app.pipeline.memory import MemoryBudget
from app.storage import (
    JPEG_CONTENT_TYPE,
    ImageStorage,
    StorageConfig,
    StoreFailure,
    build_storage,
    output_key,
    thumbnail_key,
)

log = logging.getLogger(__name__)

# The pages show outputs at most this large (app/static/pages.js scales <img> to it).
THUMBNAIL_LONG_SIDE = 240


@dataclass(frozen=True)
class StageConfig:
    """Everything the stages need, in plain values that can be sent to a worker process."""

    allow_private_hosts: str
    download_timeout_seconds: float
    max_image_bytes: int
    jpeg_quality: int
    max_image_pixels: int
    storage: StorageConfig
    downloads: int  # connections kept for downloads
    compress_slots: int  # images decoded/encoded at once
    memory_budget_bytes: int  # estimated peak memory of the decodes at once
    log_format: str = "text"  # worker processes log as the web process does (app/logs.py)
    log_level: str = "INFO"
    jpeg_optimize: bool = False  # optimized Huffman tables (JPEG_OPTIMIZE)
    jpeg_progressive: bool = False  # progressive JPEGs unless a batch says (JPEG_PROGRESSIVE)
    metadata: str = "copyright"  # what outputs publish beside the pixels (METADATA)
    color_profile: str = "srgb"  # convert to sRGB, or keep the source's profile (COLOR_PROFILE)


class StageRunner(Protocol):
    """Runs the stages for one unit somewhere: ImageStages on the calling thread, or
    app.pipeline.processes.ImageProcesses in a worker process."""

    def run(self, unit: WorkUnit) -> ImageOutcome: ...

    def close(self) -> None: ...


def _seconds_since(start: float) -> float:
    return time.perf_counter() - start


class ImageStages:
    def __init__(
        self,
        *,
        fetcher: HttpFetcher,
        storage: ImageStorage,
        jpeg_quality: int,
        max_image_pixels: int,
        memory_budget_bytes: int,
        decoding_slots: DecodingSlots,
        jpeg_optimize: bool = False,
        jpeg_progressive: bool = False,
        metadata: str = "copyright",
        color_profile: str = "srgb",
    ):
        self.fetcher = fetcher
        self.jpeg_optimize = jpeg_optimize
        self.metadata = metadata
        self.color_profile = color_profile
        self._encodings: dict[OutputOptions, Encoding] = {}  # a few per batch running
        self.default_encoding = Encoding(
            jpeg_quality,
            optimize=jpeg_optimize,
            progressive=jpeg_progressive,
            metadata=metadata,
            color_profile=color_profile,
        )
        self.storage = storage
        self.max_image_pixels = max_image_pixels
        # Downloads may run many at once; decoding and encoding only as many as there are
        # slots (as many as cores), each naming its unit in case the decoder crashes, and
        # only as many as fit the memory budget (one instance per worker process).
        self.decoding_slots = decoding_slots
        self.memory = MemoryBudget(memory_budget_bytes)

    @classmethod
    def from_config(
        cls,
        config: StageConfig,
        *,
        storage: ImageStorage | None = None,
        decoding_slots: DecodingSlots | None = None,
    ) -> "ImageStages":
        """The stages as the app runs them; `storage` replaces the one config.storage names."""
        policy = AddressPolicy(parse_allowlist(config.allow_private_hosts))
        return cls(
            fetcher=HttpFetcher(
                guarded_pool(policy, pool_size=config.downloads),
                timeout_seconds=config.download_timeout_seconds,
                max_bytes=config.max_image_bytes,
            ),
            storage=storage or build_storage(config.storage, connections=config.downloads),
            jpeg_quality=config.jpeg_quality,
            max_image_pixels=config.max_image_pixels,
            memory_budget_bytes=config.memory_budget_bytes,
            decoding_slots=decoding_slots or DecodingSlots.in_memory(config.compress_slots),
            jpeg_optimize=config.jpeg_optimize,
            jpeg_progressive=config.jpeg_progressive,
            metadata=config.metadata,
            color_profile=config.color_profile,
        )

    def encoding(self, options: OutputOptions | None) -> Encoding:
        if options is None:
            return self.default_encoding
        encoding = self._encodings.get(options)
        if encoding is None:
            encoding = self._encodings[options] = self._encoding(options)
        return encoding

    def _encoding(self, options: OutputOptions) -> Encoding:
        return Encoding(
            options.quality,
            output_format=options.pillow_format,
            optimize=self.jpeg_optimize,
            progressive=options.progressive,
            max_size=options.max_size,
            keep_smaller=options.keep_smaller,
            metadata=self.metadata,
            color_profile=self.color_profile,
        )

    def close(self) -> None:
        self.fetcher.http.clear()
        self.decoding_slots.close()

    def run(self, unit: WorkUnit) -> ImageOutcome:
        start = time.perf_counter()
        fetch_seconds = compress_seconds = None
        extension, content_type = (
            ("jpg", JPEG_CONTENT_TYPE)
            if unit.options is None
            else (unit.options.extension, unit.options.content_type)
        )
        key = output_key(unit.request_id, unit.image_id, extension)
        try:
            earlier = unit.revalidation
            # Only worth asking "changed?" when there is an output to reuse if not.
            stored = earlier.output if earlier is not None else None
            fetched = self.fetcher.fetch(unit.input_url, earlier.source if earlier and stored else None)
            fetch_seconds = _seconds_since(start)
            if earlier is not None and stored is not None:
                unchanged = fetched.source is not None and not fetched.source.no_store
                unchanged = unchanged and (
                    fetched.not_modified or fetched.source.content_sha256 == earlier.source.content_sha256
                )
                if unchanged and (reused := self._reuse(unit, stored, fetched, key, fetch_seconds)):
                    return reused
                if fetched.not_modified:  # no bytes came, and there is nothing to reuse
                    fetched = self.fetcher.fetch(unit.input_url)
                    fetch_seconds = _seconds_since(start)
            admitted_at: list[float] = []

            @contextmanager
            def admitted(cost_bytes: int) -> Iterator[None]:
                # Memory first: an image waiting for memory must not hold a core slot.
                with self.memory.reserve(cost_bytes), self.decoding_slots.take(unit.image_id, unit.attempt):
                    admitted_at.append(time.perf_counter())  # compress_ms leaves out the wait
                    yield

            compressed = compress_image(
                fetched.data,
                self.encoding(unit.options),
                max_pixels=self.max_image_pixels,
                admission=admitted,
                thumbnail_side=THUMBNAIL_LONG_SIDE,
            )
            compress_seconds = _seconds_since(admitted_at[0])
            stored_from = time.perf_counter()
            thumbnail = None
            # The thumbnail first: an output stored from now on always has one beside it.
            if compressed.thumbnail is not None:
                thumbnail = thumbnail_key(unit.request_id, unit.image_id)
                self.storage.save(thumbnail, compressed.thumbnail)
            self.storage.save(key, compressed.data, content_type)
            store_seconds = _seconds_since(stored_from)
        except (ImageFailure, StoreFailure) as failure:
            origin_failure = isinstance(failure, FetchFailure) and failure.transient
            return ImageOutcome(
                unit,
                error_code=failure.code,
                error_message=failure.message,
                retry_later=failure.transient,
                origin_failure=origin_failure,
                retry_after_seconds=getattr(failure, "retry_after_seconds", None) if origin_failure else None,
                fetch_seconds=fetch_seconds if fetch_seconds is not None else _seconds_since(start),
                compress_seconds=compress_seconds,
            )
        except Exception as exc:  # a bug must fail one image, never the batch
            log.exception("unexpected error processing image %s", unit.image_id, extra=unit.log_fields)
            return ImageOutcome(
                unit,
                error_code="internal_error",
                error_message=f"unexpected error: {exc.__class__.__name__}",
            )
        return ImageOutcome(
            unit,
            output_key=key,
            input_bytes=len(fetched.data),
            output_bytes=len(compressed.data),
            width=compressed.width,
            height=compressed.height,
            source_format=compressed.source_format,
            fetch_seconds=fetch_seconds,
            compress_seconds=compress_seconds,
            store_seconds=store_seconds,
            kept_original=compressed.kept_original,
            source=fetched.source,
            content_type=content_type,
            thumbnail_key=thumbnail,
        )

    def _reuse(
        self, unit: WorkUnit, stored: StoredOutput, fetched: FetchedImage, key: str, fetch_seconds: float
    ) -> ImageOutcome | None:
        """The outcome of copying an earlier output (and its thumbnail) under this
        request's keys; None when it is gone. A StoreFailure goes up, as for a save."""
        stored_from = time.perf_counter()
        thumbnail = thumbnail_key(unit.request_id, unit.image_id) if stored.thumbnail_key else None
        try:
            if stored.thumbnail_key and thumbnail and stored.thumbnail_key != thumbnail:
                self.storage.copy(stored.thumbnail_key, thumbnail)
            if stored.key != key:
                self.storage.copy(stored.key, key)
        except FileNotFoundError:
            log.info("the output of an earlier import is gone; encoding again", extra=unit.log_fields)
            return None
        return ImageOutcome(
            unit,
            output_key=key,
            input_bytes=stored.input_bytes,
            output_bytes=stored.output_bytes,
            width=stored.width,
            height=stored.height,
            source_format=stored.source_format,
            fetch_seconds=fetch_seconds,
            store_seconds=_seconds_since(stored_from),
            kept_original=stored.kept_original,
            source=fetched.source,
            content_type=stored.content_type,
            thumbnail_key=thumbnail,
            reused=True,
        )
