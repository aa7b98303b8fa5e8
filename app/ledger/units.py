"""What one unit of image work is and what became of it: the vocabulary the ledger, the
runners and the stages share. A leaf: nothing here imports the database, Pillow or the
network, so an image process can carry these without loading any of them.

WorkUnit carries the batch's OutputOptions (format, quality, size, keep_smaller), chosen
at upload, stored with the request as JSON and read with each claim, so every runner
honours them without a query per image. A request stored before options existed has
none (NULL): its units carry None and the stages use the settings (JPEG_QUALITY,
JPEG_PROGRESSIVE).

A unit may carry a Revalidation: what the same owner's earlier request learned about the
same URL (the origin's validators, the hash of the bytes) and, when one was stored for
the same encoding, that output. The stages then ask the origin whether the image changed
and, if not, copy the stored output instead of decoding and encoding again.
"""

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

FORMATS = ("jpeg", "webp", "avif")
# Pillow's name for each format, the output key's extension and the stored Content-Type.
PILLOW_FORMAT = {"jpeg": "JPEG", "webp": "WEBP", "avif": "AVIF"}
EXTENSION = {"jpeg": "jpg", "webp": "webp", "avif": "avif"}
CONTENT_TYPE = {"jpeg": "image/jpeg", "webp": "image/webp", "avif": "image/avif"}
MIN_QUALITY, MAX_QUALITY = 1, 95
MAX_DIMENSION = 20_000


@dataclass(frozen=True)
class OutputOptions:
    quality: int
    format: str = "jpeg"
    max_width: int | None = None
    max_height: int | None = None
    keep_smaller: bool = False
    progressive: bool = False

    @property
    def extension(self) -> str:
        return EXTENSION[self.format]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE[self.format]

    @property
    def pillow_format(self) -> str:
        return PILLOW_FORMAT[self.format]

    @property
    def max_size(self) -> tuple[int, int] | None:
        """The box the output must fit in, or None for no limit."""
        if self.max_width is None and self.max_height is None:
            return None
        return (self.max_width or MAX_DIMENSION * 10, self.max_height or MAX_DIMENSION * 10)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def as_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=256)
def options_from_json(text: str | None) -> OutputOptions | None:
    """The stored options (cached: each claim reads the same few strings again)."""
    if not text:
        return None
    return OutputOptions(**json.loads(text))


# Raise when a change to the stages changes an output's bytes for the same options and
# settings (say, what metadata it keeps): outputs stored before are then encoded again
# rather than reused by re-imports.
OUTPUT_PIPELINE_VERSION = 2


@dataclass(frozen=True)
class EncodingKeys:
    """What decides an output's bytes besides its source, as the key its reuse is stored
    under: the batch's options (the settings' for a batch uploaded without) and the
    service's output policy (METADATA, COLOR_PROFILE, JPEG_OPTIMIZE and the pipeline's
    version). An output made under another policy is never reused: it may carry metadata
    or colours this one would not publish."""

    default_options: OutputOptions | None = None
    policy: str = ""

    def of(self, options: OutputOptions | None) -> str | None:
        options = options or self.default_options
        if options is None:
            return None
        return f"{encoding_key(options)}|{self.policy}" if self.policy else encoding_key(options)


@lru_cache(maxsize=256)
def encoding_key(options: OutputOptions) -> str:
    """What makes two outputs of the same bytes equal: every option, as stable JSON
    (cached: asked twice for every image, of the same few options)."""
    return options.to_json()


@dataclass(frozen=True)
class StoredOutput:
    """An output stored for an earlier request, under that request's keys."""

    key: str
    content_type: str
    thumbnail_key: str | None
    input_bytes: int | None
    output_bytes: int | None
    width: int | None
    height: int | None
    source_format: str | None
    kept_original: bool | None


@dataclass(frozen=True)
class SourceState:
    """What a download told about its source: its validators and the hash of its bytes.
    `no_store`: the origin said Cache-Control: no-store, so nothing is reused from it."""

    content_sha256: str
    etag: str | None = None
    last_modified: str | None = None
    no_store: bool = False


@dataclass(frozen=True)
class Revalidation:
    """What an earlier request of the same owner learned about this URL: ask the origin
    with these validators; reuse `output` (stored for the same encoding) if the image has
    not changed. `output` is None when the URL was only fetched with other options."""

    source: SourceState
    output: StoredOutput | None = None


@dataclass(frozen=True)
class WorkUnit:
    image_id: int
    attempt: int
    request_pk: int
    request_id: str
    input_url: str
    crashes: int = 0  # worker crashes charged to this image before this claim
    options: OutputOptions | None = None  # the request's; None: the settings' defaults
    copies: int = 0  # rows of the same request naming the same URL, recorded with this one
    host: str | None = None  # the URL's origin host (app/net/urls.py url_host); None before 0012
    revalidation: Revalidation | None = None  # attached after the claim (ledger/revalidation.py)

    @property
    def log_fields(self) -> dict[str, object]:
        """`extra` for a log line about this image (app/logs.py shows them)."""
        return {"request_id": self.request_id, "image_id": self.image_id}


@dataclass(frozen=True)
class ImageOutcome:
    unit: WorkUnit
    output_key: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    input_bytes: int | None = None
    output_bytes: int | None = None
    width: int | None = None
    height: int | None = None
    source_format: str | None = None
    # Each stage's time, in seconds (compress leaves out the wait for memory and a slot).
    fetch_seconds: float | None = None
    compress_seconds: float | None = None
    store_seconds: float | None = None
    retry_later: bool = False  # failed transiently: back to pending with backoff, not final
    # The origin's passing trouble (429, 503, a timeout...): its host backs off, and the
    # image waits at most FETCH_RETRY_WINDOW_SECONDS; retry_after_seconds is what it asked.
    origin_failure: bool = False
    retry_after_seconds: float | None = None
    # Claimed, then found cancelled before it started: never fetched, recorded as cancelled.
    cancelled: bool = False
    kept_original: bool | None = None  # keep_smaller kept the input bytes
    # What the download told about the source, remembered for the next import of the URL;
    # the output's content type and thumbnail, remembered with it.
    source: SourceState | None = None
    content_type: str | None = None
    thumbnail_key: str | None = None
    reused: bool = False  # the source had not changed: an earlier output was copied

    @property
    def succeeded(self) -> bool:
        return self.error_code is None and not self.cancelled

    @property
    def fetch_ms(self) -> int | None:
        return None if self.fetch_seconds is None else round(self.fetch_seconds * 1000)

    @property
    def compress_ms(self) -> int | None:
        return None if self.compress_seconds is None else round(self.compress_seconds * 1000)
