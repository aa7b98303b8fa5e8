"""LOG_FORMAT=json: image lines carry their ids, one access line per request, no secrets."""

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from app.logs import configure_logging, secrets_of
from app.main import create_app
from tests.conftest import csv_of, upload, wait_finished
from tests.support import images

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_name_images_and_requests_and_hide_secrets(make_settings, image_server, json_log):
    settings = make_settings(
        api_keys="key-secret-1",
        webhook_secret=SECRET,
        aws_secret_access_key="aws-secret-2",
        aws_session_token="aws-token-3",
    )
    configure_logging("json", "INFO", secrets=secrets_of(settings), stream=json_log)
    missing = f"{image_server.base_url}/missing.jpg"
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": "Bearer key-secret-1"}
        request_id = upload(
            client, csv_of([(1, "P", [image_server.add(images.jpeg()), missing])]), headers=auth
        ).json()["request_id"]
        wait_finished(client, request_id, headers=auth)
        logging.getLogger("app.test").warning(
            "a careless line: key-secret-1 %s aws-secret-2 aws-token-3 "
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc123&x=1",
            SECRET,
        )

    entries = lines(json_log)
    failed = [e for e in entries if e["message"].startswith("image ") and "http_404" in e["message"]]
    assert failed and failed[0]["request_id"] == request_id and isinstance(failed[0]["image_id"], int)
    access = [e for e in entries if e["logger"] == "app.access"]
    assert {"method": "POST", "route": "/upload", "status": 202}.items() <= access[0].items()
    assert any(e["route"] == "/status/{request_id}" and "duration_ms" in e for e in access)
    text = json_log.getvalue()
    assert "key-secret-1" not in text and SECRET not in text and "abc123" not in text
    assert "aws-secret-2" not in text and "aws-token-3" not in text
    assert "X-Amz-Signature=[redacted]" in text


def test_text_lines_append_the_fields(json_log):
    configure_logging("text", "INFO", stream=json_log)
    logging.getLogger("app.test").info("image 7 failed", extra={"request_id": "r-1", "image_id": 7})
    assert json_log.getvalue().rstrip().endswith("image 7 failed request_id=r-1 image_id=7")
