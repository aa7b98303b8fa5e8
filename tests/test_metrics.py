"""GET /metrics after real batches, parsed as Prometheus parses it."""

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images


def scrape(client: TestClient, headers=None) -> dict[str, list]:
    """Samples by family name, from the text the endpoint served."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples, name: str, **labels) -> float:
    matching = [
        s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(matching)


@pytest.mark.parametrize(
    "image_processes", [0, pytest.param(1, marks=pytest.mark.slow, id="worker-processes")]
)
def test_metrics_count_a_batch_of_successes_and_failures(
    make_settings, image_server, webhook_receiver, image_processes
):
    settings = make_settings(image_processes=image_processes)
    ok_urls = [image_server.add(images.jpeg((64 + n, 48))) for n in range(5)]
    missing_urls = [f"{image_server.base_url}/missing-{n}.jpg" for n in range(3)]
    hook = webhook_receiver.new_url()
    rows = [
        (1, "Product one", ok_urls[:3] + missing_urls[:1]),
        (2, "Product two", ok_urls[3:] + missing_urls[1:]),
    ]

    with TestClient(create_app(settings)) as client:
        request_id = upload(client, csv_of(rows), webhook_url=hook).json()["request_id"]
        status = wait_finished(client, request_id)
        assert status["status"] == "completed_with_errors"
        assert webhook_receiver.wait_for(hook)
        client.get(f"/download/{request_id}")
        families = scrape(client)

    images_total = families["image_service_images"]
    assert value(images_total, "image_service_images_total", outcome="succeeded", code="") == 5
    assert value(images_total, "image_service_images_total", outcome="failed", code="http_404") == 3

    stages = families["image_service_stage_seconds"]
    assert value(stages, "image_service_stage_seconds_count", stage="fetch") == 8
    assert value(stages, "image_service_stage_seconds_count", stage="compress") == 5
    assert value(stages, "image_service_stage_seconds_count", stage="store") == 5
    assert value(stages, "image_service_stage_seconds_sum", stage="compress") > 0

    results = [image for product in status["products"] for image in product["images"]]
    byte_counts = families["image_service_bytes"]
    assert value(byte_counts, "image_service_bytes_total", direction="in") == sum(
        image["input_bytes"] or 0 for image in results
    )
    assert value(byte_counts, "image_service_bytes_total", direction="out") == sum(
        image["output_bytes"] or 0 for image in results
    )
    assert families["image_service_images_pending"][0].value == 0

    deliveries = families["image_service_webhook_deliveries"]
    assert value(deliveries, "image_service_webhook_deliveries_total", outcome="delivered") == 1

    http = families["image_service_http_request_seconds"]
    routes = {s.labels["route"] for s in http if s.name == "image_service_http_request_seconds_count"}
    assert {"/upload", "/status/{request_id}", "/download/{request_id}"} <= routes
    assert value(http, "image_service_http_request_seconds_count", route="/upload", status="202") == 1

    for samples in families.values():
        for sample in samples:
            for label in sample.labels.values():
                assert request_id not in label
                assert image_server.base_url not in label and "Product" not in label


def test_pending_images_are_counted_when_scraped(make_settings, image_server):
    # No runner takes the work: the images stay pending.
    settings = make_settings(task_backend="inprocess", worker_concurrency=1)
    with TestClient(create_app(settings)) as client:
        client.app.state.runner.stop()
        upload(client, csv_of([(1, "P", [image_server.add(images.jpeg()) for _ in range(4)])]))
        assert scrape(client)["image_service_images_pending"][0].value == 4


def test_metrics_need_the_metrics_token_when_set(make_settings):
    settings = make_settings(api_keys="key-one", metrics_token="scrape-me")
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        # An API key is not the metrics token.
        assert client.get("/metrics", headers={"Authorization": "Bearer key-one"}).status_code == 401
        scrape(client, headers={"Authorization": "Bearer scrape-me"})


def test_metrics_need_an_api_key_when_keys_are_set_and_no_token(make_settings):
    settings = make_settings(api_keys="key-one")
    with TestClient(create_app(settings)) as client:
        assert client.get("/metrics").status_code == 401
        scrape(client, headers={"X-API-Key": "key-one"})
