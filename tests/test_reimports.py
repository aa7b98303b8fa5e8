"""Re-imports on a real origin with ETags and 304s: the second upload of a catalogue asks
"changed?", reuses the stored outputs (copied under its own keys, nothing decoded or
encoded), and each request's outputs outlive the deletion of the other."""

import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from app.db.models import Image, SourceValidators
from app.db.session import build_engine
from app.ledger.units import SourceState
from app.main import create_app
from app.net.guard import AddressPolicy, guarded_pool, parse_allowlist
from app.pipeline.failures import HttpError
from app.pipeline.fetch import HttpFetcher
from app.storage import thumbnail_key
from tests.conftest import csv_of, stored_keys, wait_finished
from tests.support import images
from tests.support.deployment import RUNNERS
from tests.support.s3_server import TEST_REGION
from tests.support.servers import RevalidatingSource
from tests.test_lifecycle import wait_until
from tests.test_metrics import scrape, value

MEDIA_URL = "http://testserver/processed_images/"


def publish(image_server, source: RevalidatingSource) -> str:
    return image_server.add_handler(source.handler, ".jpg")


def results(status: dict) -> list[dict]:
    return [image for product in status["products"] for image in product["images"]]


def keys_of(status: dict) -> list[str]:
    return [image["output_url"].removeprefix(MEDIA_URL) for image in results(status)]


def import_catalogue(client, csv_bytes, headers=None, data=None) -> dict:
    response = client.post(
        "/upload",
        files={"file": ("products.csv", csv_bytes, "text/csv")},
        data=data or {},
        headers=headers,
    )
    assert response.status_code == 202, response.text
    return wait_finished(client, response.json()["request_id"], headers=headers)


def compress_ms_of(database_url: str, request_status: dict) -> list[int | None]:
    engine = build_engine(database_url)
    with engine.connect() as connection:
        ids = [int(key.split("/")[1].split(".")[0]) for key in keys_of(request_status)]
        values = list(connection.scalars(select(Image.compress_ms).where(Image.id.in_(ids))))
    engine.dispose()
    return values


@pytest.mark.parametrize(
    "image_processes", [0, pytest.param(1, marks=pytest.mark.slow, id="worker-processes")]
)
def test_a_reimport_answered_304_reuses_every_output_and_survives_deleting_the_first(
    make_settings, image_server, database_url, image_processes
):
    settings = make_settings(image_processes=image_processes)
    with TestClient(create_app(settings)) as client:
        reimport_and_delete(client, image_server, settings.media_root, database_url)


def reimport_and_delete(client, image_server, media_root, database_url) -> None:
    sources = [RevalidatingSource(images.jpeg((320 + n, 240))) for n in range(3)]
    urls = [publish(image_server, source) for source in sources]
    # The first URL twice: the copy row takes the reused result too.
    catalogue = csv_of([(1, "A", urls[:2]), (2, "B", [urls[2], urls[0]])])

    first = import_catalogue(client, catalogue)
    assert first["status"] == "completed" and first["progress"]["reused_images"] == 0
    assert not any(image["reused"] for image in results(first))
    second = import_catalogue(client, catalogue)

    assert second["status"] == "completed"
    assert [source.answers for source in sources] == [[(None, 200), ('"v1"', 304)]] * 3
    assert all(image["reused"] for image in results(second))
    assert second["progress"]["reused_images"] == 4 and second["progress"]["processed_images"] == 4
    assert compress_ms_of(database_url, second) == [None, None, None]  # nothing encoded
    for old, new in zip(keys_of(first), keys_of(second), strict=True):
        assert new.startswith(f"{second['request_id']}/")
        # The same file under the second request's key: a hard link, not a new encoding.
        assert os.stat(media_root / old).st_ino == os.stat(media_root / new).st_ino
    for key in set(keys_of(second)):
        image_id = int(key.split("/")[1].split(".")[0])
        assert (media_root / thumbnail_key(second["request_id"], image_id)).is_file()
    assert value(scrape(client)["image_service_images_reused"], "image_service_images_reused_total") == 3
    page = client.get(f"/status/{second['request_id']}", headers={"Accept": "text/html"}).text
    assert "4 reused from an earlier import" in page

    assert client.delete(f"/requests/{first['request_id']}").status_code == 204
    for image in results(second):
        served = client.get(image["output_url"].removeprefix("http://testserver"))
        assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"

    # With the second request deleted too, its outputs are gone: the third encodes again.
    assert client.delete(f"/requests/{second['request_id']}").status_code == 204
    third = import_catalogue(client, catalogue)
    assert third["status"] == "completed" and third["progress"]["reused_images"] == 0
    assert all((media_root / key).is_file() for key in keys_of(third))
    assert all(ms is not None for ms in compress_ms_of(database_url, third))


def test_same_bytes_without_validators_are_reused_and_changed_bytes_encoded_again(client, image_server):
    source = RevalidatingSource(images.jpeg((200, 100)), etag=None, last_modified=None)
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    first = import_catalogue(client, catalogue)
    second = import_catalogue(client, catalogue)
    assert source.statuses == [200, 200]
    assert results(second)[0]["reused"] is True

    source.body = images.jpeg((100, 200))
    third = import_catalogue(client, catalogue)
    assert results(third)[0]["reused"] is False
    assert (results(third)[0]["width"], results(first)[0]["width"]) == (100, 200)


def test_a_new_etag_means_a_new_download_and_encoding(client, image_server):
    source = RevalidatingSource(images.jpeg((200, 100)))
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    import_catalogue(client, catalogue)
    source.body, source.etag = images.jpeg((120, 100)), '"v2"'
    second = import_catalogue(client, catalogue)
    assert source.answers == [(None, 200), ('"v1"', 200)]
    assert results(second)[0]["reused"] is False and results(second)[0]["width"] == 120


def test_other_output_options_encode_again_without_asking(client, image_server):
    source = RevalidatingSource(images.jpeg((200, 100)))
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    import_catalogue(client, catalogue)
    webp = import_catalogue(client, catalogue, data={"format": "webp"})
    assert results(webp)[0]["reused"] is False and keys_of(webp)[0].endswith(".webp")
    again = import_catalogue(client, catalogue, data={"format": "webp"})
    assert results(again)[0]["reused"] is True
    # No output for webp yet: the second request was not conditional; the third was.
    assert source.answers == [(None, 200), (None, 200), ('"v1"', 304)]


@pytest.mark.parametrize(
    "setting", [{"metadata": "none"}, {"color_profile": "keep"}, {"jpeg_optimize": False}]
)
def test_an_output_made_under_other_output_settings_is_encoded_again(make_settings, image_server, setting):
    """Metadata, colour and encoder settings change an output's bytes as options do: an
    output stored under others may carry what this service would no longer publish."""
    source = RevalidatingSource(images.jpeg((200, 100)))
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    with TestClient(create_app(make_settings())) as client:
        import_catalogue(client, catalogue)
    with TestClient(create_app(make_settings(**setting))) as client:
        other = import_catalogue(client, catalogue)
        again = import_catalogue(client, catalogue)
    assert results(other)[0]["reused"] is False
    assert results(again)[0]["reused"] is True
    assert source.answers == [(None, 200), (None, 200), ('"v1"', 304)]


def test_no_store_from_the_origin_disables_reuse(client, image_server):
    source = RevalidatingSource(images.jpeg((200, 100)), headers={"Cache-Control": "private, no-store"})
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    import_catalogue(client, catalogue)
    second = import_catalogue(client, catalogue)
    assert source.answers == [(None, 200), (None, 200)]
    assert results(second)[0]["reused"] is False


def test_two_api_keys_never_share_what_they_imported(make_settings, image_server):
    source = RevalidatingSource(images.jpeg((200, 100)))
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    one, two = {"X-API-Key": "key-one"}, {"X-API-Key": "key-two"}
    with TestClient(create_app(make_settings(api_keys="key-one,key-two"))) as client:
        import_catalogue(client, catalogue, headers=one)
        theirs = import_catalogue(client, catalogue, headers=two)
        assert results(theirs)[0]["reused"] is False
        mine = import_catalogue(client, catalogue, headers=one)
        assert results(mine)[0]["reused"] is True
    assert source.answers == [(None, 200), (None, 200), ('"v1"', 304)]


def test_the_fetch_stage_sends_validators_and_reports_304(image_server):

    source = RevalidatingSource(images.jpeg((20, 20)), etag=None)
    url = publish(image_server, source)
    fetcher = HttpFetcher(
        guarded_pool(AddressPolicy(parse_allowlist(f"127.0.0.1:{image_server.port}")), pool_size=2),
        timeout_seconds=5,
        max_bytes=10**6,
    )
    fetched = fetcher.fetch(url)
    assert fetched.source is not None and not fetched.not_modified
    assert fetched.source.last_modified == source.last_modified and fetched.source.etag is None
    again = fetcher.fetch(url, fetched.source)
    assert again.not_modified and again.data == b""
    assert again.source == fetched.source


@pytest.mark.slow
def test_on_s3_a_reimport_copies_objects_that_outlive_the_first_request(
    make_settings, aws_environment, moto_server, bucket, s3_admin, image_server
):
    settings = make_settings(
        storage_backend="s3",
        s3_bucket=bucket,
        s3_prefix="outputs",
        s3_endpoint_url=moto_server.endpoint_url,
        s3_region=TEST_REGION,
    )
    sources = [RevalidatingSource(images.jpeg((160 + n, 120))) for n in range(2)]
    catalogue = csv_of([(1, "A", [publish(image_server, source) for source in sources])])
    with TestClient(create_app(settings)) as client:
        first = import_catalogue(client, catalogue)
        second = import_catalogue(client, catalogue)
        assert [source.statuses for source in sources] == [[200, 304]] * 2
        assert all(image["reused"] for image in results(second))
        first_bytes = [
            s3_admin.get_object(Bucket=bucket, Key=f"outputs/{key}")["Body"].read() for key in keys_of(first)
        ]

        assert client.delete(f"/requests/{first['request_id']}").status_code == 204
        remaining = stored_keys(s3_admin, bucket)
        assert not any(key.startswith(f"outputs/{first['request_id']}/") for key in remaining)
        for key, original in zip(keys_of(second), first_bytes, strict=True):
            assert f"outputs/{key}" in remaining
            head = s3_admin.head_object(Bucket=bucket, Key=f"outputs/{key}")
            assert head["ContentType"] == "image/jpeg"
            assert s3_admin.get_object(Bucket=bucket, Key=f"outputs/{key}")["Body"].read() == original
        assert len([key for key in remaining if "/thumbs/" in key]) == 2


def test_retention_forgets_sources_not_downloaded_within_it(make_settings, image_server, database_url):
    source = RevalidatingSource(images.jpeg((200, 100)))
    catalogue = csv_of([(1, "A", [publish(image_server, source)])])
    settings = make_settings(retention_days=0.5 / 86400, retention_interval_seconds=0.2)
    engine = build_engine(database_url)

    def remembered() -> int:
        with engine.connect() as connection:
            return len(connection.execute(select(SourceValidators.id)).all())

    try:
        with TestClient(create_app(settings)) as client:
            first = import_catalogue(client, catalogue)
            wait_until(lambda: client.get(f"/status/{first['request_id']}").status_code == 404)
            wait_until(lambda: remembered() == 0)
            again = import_catalogue(client, catalogue)
        assert results(again)[0]["reused"] is False
        assert source.answers == [(None, 200), (None, 200)]
    finally:
        engine.dispose()


def test_a_304_to_a_request_that_asked_nothing_is_an_error(image_server):
    url = image_server.add(b"", status=304)
    fetcher = HttpFetcher(
        guarded_pool(AddressPolicy(parse_allowlist(f"127.0.0.1:{image_server.port}")), pool_size=2),
        timeout_seconds=5,
        max_bytes=10**6,
    )
    with pytest.raises(HttpError) as failure:
        fetcher.fetch(url, SourceState(content_sha256="0" * 64))
    assert failure.value.code == "http_304"


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_every_runner_reuses_on_a_reimport(runner, deploy, image_server):
    sources = [RevalidatingSource(images.jpeg((120 + n, 90))) for n in range(6)]
    catalogue = csv_of([(n, f"P{n}", [publish(image_server, source)]) for n, source in enumerate(sources, 1)])
    deployment = deploy(runner)
    first = deployment.upload(catalogue)
    assert deployment.wait_done(first, timeout=60).status == "completed"
    second = deployment.upload(catalogue)
    assert deployment.wait_done(second, timeout=60).status == "completed"
    status = deployment.api.get(f"/status/{second}").json()
    assert status["progress"]["reused_images"] == 6
    assert [source.statuses for source in sources] == [[200, 304]] * 6
