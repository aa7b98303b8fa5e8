"""S3-compatible storage backend (AWS S3, MinIO, Ceph, moto).

Each object is written with one PutObject of the whole body, so readers see it whole or
not at all, and the same key always holds the same content, which lets it be cached
forever. Every failure of a write is transient (StoreFailure): an unreachable endpoint, a
throttled or failing service, and also a refused or missing bucket, which an operator
fixes in the configuration; none of them says anything about the customer's image, which
waits and is tried again (the ledger's retry_at backoff).

Credentials are the settings' AWS_* values when given (so they work from .env too), else
boto3's standard chain (environment, profiles, instance roles); they never appear in
messages.
"""

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ProxyConnectionError,
    ReadTimeoutError,
    ResponseStreamingError,
    SSLError,
)

from app.storage import StoreFailure

CACHE_CONTROL = "public, max-age=31536000, immutable"
DELETE_BATCH_SIZE = 1000  # the most keys one DeleteObjects request accepts
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the longest a SigV4 signature can be valid

THROTTLING_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
)
ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AllAccessDisabled",
        "AccountProblem",
    }
)


def normalise_prefix(prefix: str) -> str:
    """Empty, or the prefix without surrounding slashes followed by exactly one "/"."""
    stripped = prefix.strip("/")
    return f"{stripped}/" if stripped else ""


class S3Storage:
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str | None = None,
        presign_seconds: int = 3600,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        client: BaseClient | None = None,
        max_pool_connections: int = 16,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        max_attempts: int = 3,
    ):
        if not bucket:
            raise ValueError("bucket must not be empty")
        if not 1 <= presign_seconds <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"presign_seconds must be between 1 and {MAX_PRESIGN_SECONDS}")
        self.bucket = bucket
        self.prefix = normalise_prefix(prefix)
        self.presign_seconds = presign_seconds
        self._client = (
            client
            if client is not None
            else self._build_client(
                endpoint_url=endpoint_url,
                region=region,
                credentials={
                    "aws_access_key_id": access_key_id,
                    "aws_secret_access_key": secret_access_key,
                    "aws_session_token": session_token,
                },
                max_pool_connections=max_pool_connections,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_attempts=max_attempts,
            )
        )

    @staticmethod
    def _build_client(
        *,
        endpoint_url: str | None,
        region: str | None,
        credentials: dict[str, str | None],
        max_pool_connections: int,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
    ) -> BaseClient:
        options: dict = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            # The ledger waits between attempts of an image (retry_at); botocore only
            # smooths over a blip, so a dead endpoint fails within seconds.
            "retries": {"mode": "standard", "total_max_attempts": max_attempts},
            "max_pool_connections": max_pool_connections,
            "signature_version": "s3v4",
        }
        if endpoint_url:
            # Self-hosted services rarely have wildcard DNS for bucket subdomains, and many
            # reject the CRC checksums botocore adds to every upload by default since 1.36.
            options["s3"] = {"addressing_style": "path"}
            options["request_checksum_calculation"] = "when_required"
            options["response_checksum_validation"] = "when_required"
        # A session of its own: boto3's default session is not safe to share across threads.
        session = boto3.session.Session()
        return session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=Config(**options), **credentials
        )

    def _object_key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ValueError(f"invalid storage key: {key!r}")
        return f"{self.prefix}{key}"

    def save(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        object_key = self._object_key(key)
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=object_key,
                Body=data,
                ContentType=content_type,
                CacheControl=CACHE_CONTROL,
            )
        except (BotoCoreError, ClientError) as exc:
            raise StoreFailure(f"could not store the output: {self._describe(exc)}", retryable=True) from exc

    def copy(self, source_key: str, target_key: str) -> None:
        """A server-side CopyObject: the bytes never leave the bucket; the content type
        and cache headers go with them."""
        source = self._object_key(source_key)
        try:
            self._client.copy_object(
                Bucket=self.bucket,
                Key=self._object_key(target_key),
                CopySource={"Bucket": self.bucket, "Key": source},
                MetadataDirective="COPY",
            )
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404"}:
                raise FileNotFoundError(f"no stored object {source}") from exc
            raise StoreFailure(f"could not store the output: {self._describe(exc)}", retryable=True) from exc
        except BotoCoreError as exc:
            raise StoreFailure(f"could not store the output: {self._describe(exc)}", retryable=True) from exc

    def open(self, key: str) -> bytes:
        """The stored bytes of key; FileNotFoundError when there is no such object."""
        object_key = self._object_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=object_key)
            body = response["Body"]
            try:
                return body.read()
            finally:
                body.close()
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404"}:
                raise FileNotFoundError(f"no stored object {object_key}") from exc
            raise StoreFailure(f"could not read {object_key}: {self._describe(exc)}", retryable=True) from exc
        except BotoCoreError as exc:
            raise StoreFailure(f"could not read {object_key}: {self._describe(exc)}", retryable=True) from exc

    def exists(self, key: str) -> bool:
        object_key = self._object_key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=object_key)
        except ClientError as exc:
            if _error_code(exc) in {"NoSuchKey", "404"}:
                return False
            raise StoreFailure(f"could not read {object_key}: {self._describe(exc)}", retryable=True) from exc
        except BotoCoreError as exc:
            raise StoreFailure(f"could not read {object_key}: {self._describe(exc)}", retryable=True) from exc
        return True

    def delete_prefix(self, key_prefix: str) -> int:
        """Delete every object whose key starts with prefix + key_prefix; return how many.

        Plain string prefix, as S3 lists it: pass "abc/" to leave "abcd/..." alone.
        """
        full_prefix = f"{self.prefix}{key_prefix}"
        if not full_prefix:
            raise ValueError("refusing to delete every object in the bucket")
        deleted = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix, PaginationConfig={"PageSize": DELETE_BATCH_SIZE}
            )
            for page in pages:
                keys = [item["Key"] for item in page.get("Contents", [])]
                for start in range(0, len(keys), DELETE_BATCH_SIZE):
                    batch = keys[start : start + DELETE_BATCH_SIZE]
                    response = self._client.delete_objects(
                        Bucket=self.bucket,
                        Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
                    )
                    errors = response.get("Errors", [])
                    deleted += len(batch) - len(errors)
                    if errors:
                        codes = sorted({error.get("Code", "unknown") for error in errors})
                        raise StoreFailure(
                            f"could not delete {len(errors)} of {len(batch)} objects under "
                            f"{full_prefix} ({', '.join(codes)}); {deleted} deleted",
                            retryable=True,
                        )
        except (BotoCoreError, ClientError) as exc:
            raise StoreFailure(
                f"could not delete objects under {full_prefix}: {self._describe(exc)}; {deleted} deleted",
                retryable=True,
            ) from exc
        return deleted

    def presigned_url(self, key: str) -> str:
        try:
            return self._client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._object_key(key)},
                ExpiresIn=self.presign_seconds,
            )
        except BotoCoreError as exc:
            raise StoreFailure(f"could not sign a download URL: {self._describe(exc)}") from exc

    def check(self) -> str | None:
        """None when the bucket answers; otherwise a sentence saying what is wrong."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            return f"S3 storage is not usable: {self._describe(exc)}."
        return None

    def _describe(self, exc: Exception) -> str:
        """What went wrong, in words; built from the error's class and code only, since
        botocore's own messages can carry full URLs."""
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket" or (code == "404" and exc.operation_name == "HeadBucket"):
                return f"the bucket {self.bucket} does not exist"
            if code in {"301", "PermanentRedirect", "AuthorizationHeaderMalformed"}:
                return f"the bucket {self.bucket} is in another region than the one configured"
            if code in ACCESS_CODES or status == 403:
                return f"access to the bucket {self.bucket} was refused ({code})"
            if code in THROTTLING_CODES or status in {429, 503}:
                return f"the storage service is throttling requests ({code})"
            return f"the storage service answered HTTP {status} ({code})"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return "no complete storage credentials were found"
        if isinstance(exc, ReadTimeoutError):
            return "the storage service did not answer in time"
        if isinstance(exc, ConnectTimeoutError):
            return "connecting to the storage endpoint timed out"
        if isinstance(exc, SSLError):
            return "the TLS handshake with the storage endpoint failed"
        if isinstance(exc, ProxyConnectionError):
            return "could not connect to the storage endpoint through the proxy"
        if isinstance(exc, EndpointConnectionError):
            return "could not connect to the storage endpoint"
        if isinstance(exc, ConnectionClosedError | ResponseStreamingError):
            return "the connection to the storage service broke"
        return f"storage client error ({type(exc).__name__})"


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))
