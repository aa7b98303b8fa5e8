"""The one settings class. Every key is documented in .env.example."""

import base64
import binascii
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
WEBHOOK_SECRET_PREFIX = "whsec_"
MIN_WEBHOOK_SECRET_BYTES = 24


def webhook_secret_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks secret (whsec_<base64>); ValueError if the secret is not one."""
    if not secret.startswith(WEBHOOK_SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {WEBHOOK_SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"the part after {WEBHOOK_SECRET_PREFIX!r} is not valid base64 ({exc})") from None
    if len(key) < MIN_WEBHOOK_SECRET_BYTES:
        raise ValueError(f"the key is {len(key)} bytes; at least {MIN_WEBHOOK_SECRET_BYTES} are needed")
    return key


def _default_concurrency() -> int:
    # Downloads wait on the network while compression needs a core: keep several
    # downloads in flight per core so the cores never starve.
    return max(4, 4 * (os.cpu_count() or 1))


class Settings(BaseSettings):
    # Errors never echo the value: it may be a secret (WEBHOOK_SECRET, API_KEYS, a database password).
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", hide_input_in_errors=True
    )

    # -- the service: where it listens, its database, its runner -------------------------
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = f"sqlite:///{PROJECT_ROOT / 'data' / 'images.db'}"
    public_base_url: str = ""
    # Host names besides PUBLIC_BASE_URL's and HOST's that requests may name; "*" allows any.
    allowed_hosts: str = ""
    task_backend: Literal["inprocess", "celery"] = "inprocess"
    celery_broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    celery_queue: str = Field("image_service", min_length=1)
    # Celery node name of a worker (`make worker`); empty: worker-<pid>@<host>, unique per host.
    worker_name: str = ""

    # -- outputs: where they are stored and published --------------------------------------
    media_root: Path = PROJECT_ROOT / "processed_images"
    storage_backend: Literal["local", "s3"] = "local"
    media_public_base_url: str = ""
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_presign_seconds: int = Field(3600, ge=1, le=7 * 24 * 3600)
    # boto3 reads only the process environment; read here, they also work from .env.
    aws_access_key_id: str = ""
    aws_secret_access_key: str = ""
    aws_session_token: str = ""
    aws_default_region: str = ""

    # -- images: encoding, limits, and the processes that do the work ----------------------
    jpeg_quality: int = Field(50, ge=1, le=95)
    jpeg_optimize: bool = True
    jpeg_progressive: bool = False
    # Images in flight per runner (downloads waiting on the network included).
    image_concurrency: int = Field(
        default_factory=_default_concurrency,
        ge=1,
        validation_alias=AliasChoices("image_concurrency", "worker_concurrency"),
    )
    compress_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    image_processes: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=0)
    image_process_niceness: int = Field(10, ge=0, le=19)
    download_timeout_seconds: float = Field(30.0, gt=0)
    max_image_bytes: int = Field(128 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(100_000_000, gt=0)
    # Enough for the costliest 100 MP image the estimate knows (an EXIF-rotated WebP,
    # about 2.2 GB at quality 95), so the default MAX_IMAGE_PIXELS is never refused for memory.
    image_memory_mb: int = Field(
        2304, gt=0, validation_alias=AliasChoices("image_memory_mb", "worker_memory_mb")
    )
    allow_private_hosts: str = ""
    # What every output carries beside its pixels: only the EXIF Copyright and Artist
    # fields, or nothing (app/pipeline/metadata.py); and its colours: converted to sRGB
    # without a profile, or the source's profile kept (app/pipeline/colour.py).
    metadata: Literal["copyright", "none"] = "copyright"
    color_profile: Literal["srgb", "keep"] = "srgb"

    # -- the ledger: claims, recovery, waiting after a transient failure ------------------
    lease_seconds: float = Field(30.0, gt=0)
    recovery_interval_seconds: float = Field(30.0, gt=0)
    shutdown_grace_seconds: float = Field(20.0, ge=0)
    transient_retry_base_seconds: float = Field(1.0, gt=0)
    transient_retry_max_seconds: float = Field(60.0, gt=0)
    # Per-host politeness (docs/fetching.md): images of one origin host in flight at once,
    # across every process; how long an image waits for a failing origin; how long a host
    # backs off (Retry-After capped, else exponential with jitter); and after how many
    # failed rounds in a row the host gets one image at a time until it answers.
    fetch_per_host_concurrency: int = Field(8, ge=1)
    fetch_retry_window_seconds: float = Field(900.0, ge=0)
    fetch_retry_after_max_seconds: float = Field(600.0, ge=0)
    fetch_host_backoff_base_seconds: float = Field(1.0, gt=0)
    fetch_host_backoff_max_seconds: float = Field(120.0, gt=0)
    fetch_breaker_failures: int = Field(5, ge=1)

    # -- uploads ---------------------------------------------------------------------------
    # A catalogue of a million products: 3 URLs of about 120 characters a row is about
    # 400 bytes a row. The body is spooled to a temporary file and read in blocks, so the
    # size costs temporary disk, not memory (docs/operations.md, "Large catalogues").
    max_csv_bytes: int = Field(512 * 1024 * 1024, gt=0)
    max_line_bytes: int = Field(1024 * 1024, gt=0)
    max_rows: int = Field(1_000_000, gt=0)
    max_urls_per_row: int = Field(50, gt=0)
    # An upload of more rows than this is answered once its CSV is checked (`importing`)
    # and stored after the answer, from a file of its checked rows under import_dir that
    # lives until it is stored (a restart resumes it); 0: every upload is stored first.
    background_import_rows: int = Field(100_000, ge=0)
    import_dir: Path = PROJECT_ROOT / "data" / "imports"
    idempotency_key_ttl_seconds: float = Field(24 * 3600, gt=0)
    csv_escape_formulas: bool = True
    api_keys: str = ""

    # -- webhooks --------------------------------------------------------------------------
    webhook_secret: str = ""
    webhook_allow_private_hosts: str = ""
    webhook_timeout_seconds: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(8, ge=1)
    webhook_retry_base_seconds: float = Field(60.0, gt=0)

    # -- operations: logs, metrics, retention ----------------------------------------------
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    metrics_token: str = ""
    metrics_port: int = Field(0, ge=0, le=65535)
    # Days a finished request is kept (fractions allowed); 0 keeps everything.
    retention_days: float = Field(30.0, ge=0)
    retention_interval_seconds: float = Field(3600.0, gt=0)

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_in_capitals(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_is_standard_webhooks(cls, value: str) -> str:
        if value:
            try:
                webhook_secret_key(value)
            except ValueError as exc:
                raise ValueError(
                    "WEBHOOK_SECRET must be a Standard Webhooks secret: 'whsec_' followed by "
                    f"the base64 of at least {MIN_WEBHOOK_SECRET_BYTES} random bytes; {exc}"
                ) from None
        return value

    @property
    def api_key_list(self) -> list[str]:
        return [key.strip() for key in self.api_keys.split(",") if key.strip()]

    @property
    def base_url(self) -> str:
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def media_url(self) -> str:
        return f"{self.base_url}/processed_images"

    @property
    def output_url_base(self) -> str:
        """Where output keys are reachable: a CDN or public bucket, else this service."""
        return (self.media_public_base_url or self.media_url).rstrip("/")

    @model_validator(mode="after")
    def _backends_are_complete(self) -> "Settings":
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("STORAGE_BACKEND=s3 needs S3_BUCKET")
        if self.task_backend == "celery" and self.database_url.startswith("sqlite"):
            raise ValueError(
                "TASK_BACKEND=celery needs a database every worker can reach, such as "
                "PostgreSQL (DATABASE_URL=postgresql+psycopg2://...); a SQLite file belongs "
                "to one machine and allows one writer at a time"
            )
        return self


ENV_FILE_VARIABLE = "ENV_FILE"


def env_file() -> str | None:
    """The dotenv file the settings read: .env in the working directory, another file
    named by ENV_FILE, or none when ENV_FILE is set empty (the tests do, so that a
    developer's .env never reaches the processes they start)."""
    return os.environ.get(ENV_FILE_VARIABLE, ".env") or None


@lru_cache
def get_settings() -> Settings:
    return Settings(_env_file=env_file())


def settings_or_exit() -> Settings:
    """The settings, for a process's entry point: a wrong setting stops it with a message
    naming what is wrong, not a traceback."""
    try:
        return get_settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']).upper() or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise SystemExit(f"the service cannot start: {problems}") from None
