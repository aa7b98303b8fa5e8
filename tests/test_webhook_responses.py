"""What a webhook attempt keeps of the receiver's answer, and where it stops: the response
excerpt's length and byte cap, undecodable bodies, redirects and a receiver that never answers."""

import gzip
import socket
import threading
import time

from fastapi.testclient import TestClient

from app.main import create_app
from tests.support.servers import send
from tests.test_api import SECRET
from tests.test_webhooks import finished_request, wait_webhook_state


def _deliveries(client, request_id) -> list[dict]:
    return client.get(f"/requests/{request_id}/webhook-deliveries").json()["deliveries"]


def _one_attempt(make_settings, image_server, receiver, state: str, **settings) -> dict:
    settings = make_settings(webhook_secret=SECRET, webhook_max_attempts=1, **settings)
    with TestClient(create_app(settings)) as client:
        request_id = finished_request(client, image_server, image_server.add_handler(receiver))
        wait_webhook_state(client, request_id, state)
        (delivery,) = _deliveries(client, request_id)
    return delivery


def _answering(status: int, body: bytes):
    def receiver(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        send(request, status, body, {"Content-Type": "text/plain"})

    return receiver


def test_the_response_excerpt_keeps_the_first_500_characters_of_a_long_body(make_settings, image_server):
    body = ("0123456789" * 300).encode()
    delivery = _one_attempt(make_settings, image_server, _answering(200, body), "delivered")
    assert delivery["status_code"] == 200 and delivery["error"] is None
    assert delivery["response_excerpt"] == body.decode()[:500]


def test_a_body_that_is_not_utf8_is_kept_with_replacement_characters(make_settings, image_server):
    body = b"refused: caf\xe9 \xff\xfe closed"
    delivery = _one_attempt(make_settings, image_server, _answering(500, body), "failed")
    assert delivery["status_code"] == 500 and delivery["error"] == "HTTP 500"
    assert delivery["response_excerpt"] == "refused: caf\ufffd \ufffd\ufffd closed"


def test_a_compressed_body_is_kept_decompressed(make_settings, image_server):
    def compressed(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        send(request, 200, gzip.compress(b"accepted, thanks"), {"Content-Encoding": "gzip"})

    delivery = _one_attempt(make_settings, image_server, compressed, "delivered")
    assert delivery["response_excerpt"] == "accepted, thanks"


def test_the_excerpt_reads_only_its_byte_cap_of_a_body_that_never_ends(make_settings, image_server):
    """500 four-byte characters, then the receiver goes quiet with most of its announced body
    unsent: the attempt reads the 2000 bytes it keeps and does not wait for the rest."""
    excerpt = "\U0001f600" * 500
    release = threading.Event()

    def endless(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        request.send_response(200)
        request.send_header("Content-Length", "10000000")
        request.end_headers()
        request.wfile.write(excerpt.encode())
        request.wfile.flush()
        release.wait(30)

    try:
        delivery = _one_attempt(make_settings, image_server, endless, "delivered", webhook_timeout_seconds=5)
    finally:
        release.set()
    assert delivery["status_code"] == 200
    assert delivery["response_excerpt"] == excerpt
    assert delivery["duration_ms"] < 4000  # well inside the timeout: it did not wait for more


def test_a_redirect_from_the_receiver_is_not_followed(make_settings, image_server):
    target_hits = threading.Event()

    def redirect_target(request):
        target_hits.set()
        send(request, 200, b"followed")

    target = [image_server.add_handler(redirect_target)]

    def redirecting(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        send(request, 307, b"moved", {"Location": target[0]})

    delivery = _one_attempt(make_settings, image_server, redirecting, "failed")
    assert delivery["status_code"] == 307 and delivery["error"] == "HTTP 307"
    assert delivery["response_excerpt"] == "moved"
    assert not target_hits.is_set() and image_server.hits_for(target[0]) == 0


def test_a_receiver_that_never_accepts_the_connection_times_out(make_settings, image_server):
    """A listening socket whose one-place accept queue is full: connects to it hang (their
    SYNs are dropped), so only the attempt's own timeout ends them."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = socket.create_connection(("127.0.0.1", port))
    try:
        settings = make_settings(
            webhook_secret=SECRET,
            webhook_max_attempts=1,
            webhook_timeout_seconds=1,
            webhook_allow_private_hosts=f"127.0.0.1:{image_server.port},127.0.0.1:{port}",
        )
        with TestClient(create_app(settings)) as client:
            started = time.monotonic()
            request_id = finished_request(client, image_server, f"http://127.0.0.1:{port}/hook")
            webhook = wait_webhook_state(client, request_id, "failed", timeout=10)
            elapsed = time.monotonic() - started
            (delivery,) = _deliveries(client, request_id)
    finally:
        # Closing the listener refuses any connect still waiting, so nothing outlives the test.
        queued.close()
        listener.close()
    assert webhook["last_error"] == "timeout after 1 s"
    assert delivery["status_code"] is None and delivery["duration_ms"] < 5000
    assert elapsed < 10


def test_a_redirect_with_a_body_that_never_ends_is_recorded_with_its_capped_excerpt(
    make_settings, image_server
):
    """A redirect is an answer like any other: its body is read only up to the excerpt's cap,
    never in full (a receiver could send gigabytes before the timeout)."""
    release = threading.Event()

    def endless_redirect(request):
        request.rfile.read(int(request.headers["Content-Length"]))
        request.send_response(307)
        request.send_header("Location", "http://127.0.0.1:1/elsewhere")
        request.send_header("Content-Length", "10000000")
        request.end_headers()
        request.wfile.write(b"m" * 2000)
        request.wfile.flush()
        release.wait(30)

    try:
        delivery = _one_attempt(
            make_settings, image_server, endless_redirect, "failed", webhook_timeout_seconds=5
        )
    finally:
        release.set()
    assert delivery["status_code"] == 307 and delivery["error"] == "HTTP 307"
    assert delivery["response_excerpt"] == "m" * 500
    assert delivery["duration_ms"] < 4000
