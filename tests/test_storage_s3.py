"""S3Storage against a real S3 endpoint: moto's server in a subprocess on 127.0.0.1."""

import socket
import time
from collections.abc import Callable

import pytest
import requests

import app.storage.s3
from app.storage import StoreFailure
from app.storage.s3 import CACHE_CONTROL, S3Storage, normalise_prefix
from tests.conftest import stored_keys
from tests.support.s3_server import TEST_REGION

pytestmark = pytest.mark.slow

JPEG_BYTES = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4 + b"\xff\xd9"


@pytest.fixture
def make_storage(aws_environment, moto_server, bucket) -> Callable[..., S3Storage]:
    """S3Storage built the way the app builds it (credentials from the environment),
    pointed at moto directly unless an endpoint_url is given."""

    def make(**overrides) -> S3Storage:
        options = {"bucket": bucket, "endpoint_url": moto_server.endpoint_url, "region": TEST_REGION}
        return S3Storage(**{**options, **overrides})

    return make


def test_saved_bytes_read_back(make_storage):
    storage = make_storage()
    storage.save("request-1/1.jpg", JPEG_BYTES)
    assert storage.open("request-1/1.jpg") == JPEG_BYTES


def test_object_has_content_type_and_long_cache_control(make_storage, s3_admin, bucket):
    make_storage().save("request-1/1.jpg", JPEG_BYTES)
    make_storage().save("request-1/result.csv", b"a,b\n", content_type="text/csv")

    image = s3_admin.head_object(Bucket=bucket, Key="request-1/1.jpg")
    csv = s3_admin.head_object(Bucket=bucket, Key="request-1/result.csv")
    assert image["ContentType"] == "image/jpeg"
    assert image["CacheControl"] == "public, max-age=31536000, immutable" == CACHE_CONTROL
    assert image["ContentLength"] == len(JPEG_BYTES)
    assert csv["ContentType"] == "text/csv"


def test_saving_a_key_again_overwrites_it(make_storage, s3_admin, bucket):
    storage = make_storage()
    storage.save("request-1/1.jpg", b"first")
    storage.save("request-1/1.jpg", JPEG_BYTES)

    assert stored_keys(s3_admin, bucket) == ["request-1/1.jpg"]
    assert storage.open("request-1/1.jpg") == JPEG_BYTES


@pytest.mark.parametrize(
    ("given", "normalised"),
    [("", ""), ("/", ""), ("media", "media/"), ("media/", "media/"), ("/media//", "media/"), ("a/b", "a/b/")],
)
def test_prefix_is_empty_or_ends_in_one_slash(given, normalised):
    assert normalise_prefix(given) == normalised


def test_objects_are_stored_under_the_prefix(make_storage, s3_admin, bucket):
    storage = make_storage(prefix="/tenant-a//")
    storage.save("request-1/1.jpg", JPEG_BYTES)

    assert stored_keys(s3_admin, bucket) == ["tenant-a/request-1/1.jpg"]
    assert storage.open("request-1/1.jpg") == JPEG_BYTES
    with pytest.raises(FileNotFoundError):
        make_storage().open("request-1/1.jpg")


def test_delete_prefix_removes_only_that_prefix(make_storage, s3_admin, bucket):
    storage = make_storage(prefix="media")
    for name in ("request-1/1.jpg", "request-1/2.jpg", "request-10/1.jpg", "request-2/1.jpg"):
        storage.save(name, b"x")
    make_storage().save("request-1/outside-the-prefix.jpg", b"x")

    assert storage.delete_prefix("request-1/") == 2
    assert stored_keys(s3_admin, bucket) == [
        "media/request-10/1.jpg",
        "media/request-2/1.jpg",
        "request-1/outside-the-prefix.jpg",
    ]
    assert storage.delete_prefix("request-1/") == 0


def test_delete_prefix_goes_through_every_page(make_storage, s3_admin, bucket, monkeypatch):
    # A batch of 2 rather than 1000 objects: the same paging, without a thousand uploads.
    monkeypatch.setattr(app.storage.s3, "DELETE_BATCH_SIZE", 2)
    storage = make_storage()
    delete_requests = []
    storage._client.meta.events.register(
        "before-call.s3.DeleteObjects", lambda **kwargs: delete_requests.append(kwargs)
    )
    for number in range(5):
        s3_admin.put_object(Bucket=bucket, Key=f"request-1/{number}.jpg", Body=b"x")
    s3_admin.put_object(Bucket=bucket, Key="request-2/1.jpg", Body=b"x")

    assert storage.delete_prefix("request-1/") == 5
    assert len(delete_requests) == 3
    assert stored_keys(s3_admin, bucket) == ["request-2/1.jpg"]


def test_delete_prefix_refuses_to_empty_the_bucket(make_storage):
    with pytest.raises(ValueError):
        make_storage().delete_prefix("")


def test_presigned_url_downloads_the_bytes(make_storage, moto_server):
    storage = make_storage(prefix="media", presign_seconds=120)
    storage.save("request-1/1.jpg", JPEG_BYTES)

    url = storage.presigned_url("request-1/1.jpg")
    assert url.startswith(f"{moto_server.endpoint_url}/")
    assert "X-Amz-Expires=120" in url
    http = requests.Session()
    http.trust_env = False
    response = http.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == JPEG_BYTES
    assert response.headers["Content-Type"] == "image/jpeg"


def test_check_is_none_when_the_bucket_answers(make_storage):
    assert make_storage().check() is None


def test_check_says_when_the_bucket_does_not_exist(make_storage):
    problem = make_storage(bucket="no-such-bucket-here").check()

    assert problem is not None
    assert "no-such-bucket-here" in problem
    assert "does not exist" in problem
    assert "testing" not in problem


def test_save_to_a_missing_bucket_is_a_retryable_store_failure(make_storage):
    with pytest.raises(StoreFailure) as failure:
        make_storage(bucket="no-such-bucket-here").save("request-1/1.jpg", JPEG_BYTES)

    assert failure.value.retryable is True
    assert failure.value.code == "storage_error"
    assert "no-such-bucket-here does not exist" in failure.value.message


def test_save_fails_fast_and_retryably_while_the_endpoint_is_down(make_storage, running_s3_proxy):
    storage = make_storage(endpoint_url=running_s3_proxy.url)
    storage.save("request-1/1.jpg", b"before")  # leaves a pooled connection to be cut

    running_s3_proxy.pause()
    started = time.monotonic()
    with pytest.raises(StoreFailure) as failure:
        storage.save("request-1/1.jpg", JPEG_BYTES)
    elapsed = time.monotonic() - started

    assert failure.value.retryable is True
    assert "could not connect to the storage endpoint" in failure.value.message
    assert "127.0.0.1" not in failure.value.message
    # Refused connections: three attempts, botocore's standard backoff for them is tens of
    # ms. The bound is the configured timeouts (3 attempts of 3 s to connect) and some for
    # a busy machine; what it catches is botocore's 60 s defaults.
    print(f"save against a paused endpoint failed after {elapsed:.2f} s")
    assert elapsed < 3 * 3 + 6
    assert storage.check() is not None

    running_s3_proxy.resume()
    storage.save("request-1/1.jpg", JPEG_BYTES)
    assert storage.open("request-1/1.jpg") == JPEG_BYTES
    assert storage.check() is None


def test_save_against_a_silent_endpoint_fails_within_the_timeouts(make_storage):
    # A listening socket nobody accepts on: the kernel completes the handshake, then
    # nothing ever answers, as with a hung service.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        storage = make_storage(endpoint_url=f"http://127.0.0.1:{port}", read_timeout=1, max_attempts=2)
        started = time.monotonic()
        with pytest.raises(StoreFailure) as failure:
            storage.save("request-1/1.jpg", JPEG_BYTES)
        elapsed = time.monotonic() - started

    assert failure.value.retryable is True
    assert "did not answer in time" in failure.value.message
    print(f"save against a silent endpoint failed after {elapsed:.2f} s")
    # Per attempt: up to 1 s waiting for "100 Continue" (botocore sends Expect on uploads),
    # then the 1 s read timeout; at most 4 s and the backoff, with as much again for a busy
    # machine, still far from botocore's 60 s default read timeout. The lower bound cannot
    # be upset by load.
    assert 2 <= elapsed < 4 + 8
