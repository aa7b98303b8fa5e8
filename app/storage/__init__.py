"""Where output images live: the contract every backend meets, and how one is chosen.

    local.py   files under MEDIA_ROOT, served by this service at /processed_images/
    s3.py      an S3-compatible bucket (AWS, MinIO, Ceph, R2)

The database stores each output's key (`{request_id}/{image_id}.jpg`, or `.webp`/`.avif`
for a batch that asks for that format), never a URL; its thumbnail is stored beside it
(`{request_id}/thumbs/{image_id}.jpg`, thumbnail_key). URLs
are built when read (OutputUrls), so a new PUBLIC_BASE_URL, MEDIA_PUBLIC_BASE_URL or
storage backend changes every link at once. Keys come from database ids only, and the
same image always gets the same key, so processing it twice overwrites rather than adds.
Every failure to store is transient (StoreFailure): the image waits and is tried again.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

JPEG_CONTENT_TYPE = "image/jpeg"


class StoreFailure(Exception):
    """Storing or reading an output failed. The key and the bytes are ours, so this is the
    storage's trouble (ENOSPC, EIO, a read-only remount, an object store's 5xx or
    throttling), not the image's: the image waits and is tried again."""

    code = "storage_error"
    transient = True

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.message = message
        self.retryable = retryable


def output_key(request_id: str, image_id: int, extension: str = "jpg") -> str:
    return f"{request_id}/{image_id}.{extension}"


def thumbnail_key(request_id: str, image_id: int) -> str:
    """The thumbnail stored beside an output: under the request's prefix, so it goes with
    the request's outputs."""
    return f"{request_id}/thumbs/{image_id}.jpg"


def request_prefix(request_id: str) -> str:
    """The prefix of every key stored for a request (outputs and thumbnails)."""
    return f"{request_id}/"


class ImageStorage(Protocol):
    def save(self, key: str, data: bytes, content_type: str = JPEG_CONTENT_TYPE) -> None:
        """Store data under key, whole or not at all; raises StoreFailure."""

    def open(self, key: str) -> bytes:
        """The bytes stored under key; FileNotFoundError when there are none."""

    def copy(self, source_key: str, target_key: str) -> None:
        """Store under target_key what source_key holds, whole or not at all, without
        reading it through this process (a re-import's output, app/pipeline/stages.py);
        FileNotFoundError when source_key holds nothing; otherwise raises StoreFailure.
        The two stay independent: deleting either leaves the other."""

    def exists(self, key: str) -> bool:
        """Whether something is stored under key, without reading it; raises StoreFailure."""

    def delete_prefix(self, key_prefix: str) -> int:
        """Remove every output under key_prefix (e.g. "{request_id}/"); returns how many."""

    def check(self) -> str | None:
        """None when outputs can be stored; otherwise a sentence saying what is wrong."""


def delete_requests_outputs(storage: ImageStorage, request_ids: set[str]) -> int:
    """Remove everything stored for these requests; returns how many keys went."""
    return sum(storage.delete_prefix(request_prefix(request_id)) for request_id in sorted(request_ids))


@dataclass(frozen=True)
class StorageConfig:
    """The storage settings, in plain values that can be sent to a worker process."""

    backend: Literal["local", "s3"]
    media_root: Path
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_presign_seconds: int = 3600
    # Empty: boto3's standard chain (environment, profile, instance role).
    s3_access_key_id: str = ""
    s3_secret_access_key: str = field(default="", repr=False)
    s3_session_token: str = field(default="", repr=False)


def build_storage(config: StorageConfig, *, connections: int = 16) -> ImageStorage:
    if config.backend == "s3":
        from app.storage.s3 import S3Storage  # boto3 loads only where S3 is used

        return S3Storage(
            bucket=config.s3_bucket,
            prefix=config.s3_prefix,
            endpoint_url=config.s3_endpoint_url or None,
            region=config.s3_region or None,
            presign_seconds=config.s3_presign_seconds,
            access_key_id=config.s3_access_key_id or None,
            secret_access_key=config.s3_secret_access_key or None,
            session_token=config.s3_session_token or None,
            max_pool_connections=connections,
        )
    from app.storage.local import LocalFileStorage

    return LocalFileStorage(config.media_root)


class OutputUrls:
    """Public URLs of output keys: under MEDIA_PUBLIC_BASE_URL (a CDN or public bucket)
    when set, else this service's /processed_images/ (which redirects to a presigned URL
    when the outputs are in S3)."""

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")

    def url(self, key: str | None) -> str | None:
        return f"{self.base_url}/{key}" if key else None
