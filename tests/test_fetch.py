"""The fetch stage against real local servers, including hostile ones."""

import gzip
import ipaddress
import socket
import time
from datetime import UTC, datetime

import pytest

from app.net import failures as net_failures
from app.net.guard import AddressPolicy, guarded_pool, is_public_address
from app.pipeline.failures import (
    BlockedAddress,
    ConnectionFailed,
    HttpError,
    InvalidUrl,
    TooLarge,
    TooManyRedirects,
    UpstreamTimeout,
)
from app.pipeline.fetch import HttpFetcher, retry_after_seconds
from tests.support import images
from tests.support.servers import LocalServer, dripping_body, dripping_headers, observed, send


@pytest.fixture
def fetcher(image_server):
    policy = AddressPolicy(frozenset({("127.0.0.1", image_server.port)}))
    return HttpFetcher(
        guarded_pool(policy, pool_size=4),
        timeout_seconds=1.5,
        max_bytes=1_000_000,
        retry_backoff_seconds=0.01,
    )


@pytest.fixture(scope="module")
def outside_server():
    """A loopback server that is not on the allowlist: it must never be reached."""
    with LocalServer() as server:
        yield server


def test_fetches_an_image(fetcher, image_server):
    data = images.jpeg()
    assert fetcher.fetch(image_server.add(data)).data == data


def test_404_is_final_and_not_retried(fetcher, image_server):
    url = image_server.add(b"gone", status=404)
    with pytest.raises(HttpError) as failure:
        fetcher.fetch(url)
    assert failure.value.code == "http_404"
    assert image_server.hits_for(url) == 1


def test_5xx_is_retried_then_succeeds(fetcher, image_server):
    data = images.jpeg()
    calls = []

    def flaky(request):
        calls.append(1)
        if len(calls) < 3:
            send(request, 502, b"bad gateway")
        else:
            send(request, 200, data, {"Content-Type": "image/jpeg"})

    assert fetcher.fetch(image_server.add_handler(flaky)).data == data
    assert len(calls) == 3


@pytest.mark.parametrize("status", [429, 503])
def test_slow_down_answers_are_not_retried_at_once_and_carry_retry_after(fetcher, image_server, status):
    url = image_server.add(b"slow down", status=status, headers={"Retry-After": "7"})
    with pytest.raises(HttpError) as failure:
        fetcher.fetch(url)
    assert failure.value.code == f"http_{status}"
    assert image_server.hits_for(url) == 1  # the host backs off as a whole instead (app/ledger)
    assert failure.value.transient and failure.value.retry_after_seconds == 7


def test_retry_after_as_an_http_date(fetcher, image_server):
    url = image_server.add(b"slow down", status=429, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    with pytest.raises(HttpError) as failure:
        fetcher.fetch(url)
    assert failure.value.retry_after_seconds == 0  # a date in the past: no wait
    assert (
        retry_after_seconds("Thu, 03 Dec 2026 10:00:40 GMT", datetime(2026, 12, 3, 10, 0, tzinfo=UTC)) == 40
    )
    assert retry_after_seconds("soon") is None


@pytest.mark.parametrize(
    ("status", "transient"), [(404, False), (403, False), (500, True), (504, True), (408, True)]
)
def test_which_answers_are_transient(fetcher, image_server, status, transient):
    fetcher.retry_backoff_seconds = 0.01
    with pytest.raises(HttpError) as failure:
        fetcher.fetch(image_server.add(b"no", status=status))
    assert failure.value.transient is transient


def test_redirects_are_followed(fetcher, image_server):
    data = images.jpeg()
    target = image_server.add(data)
    url = image_server.add(b"", status=302, headers={"Location": target})
    assert fetcher.fetch(url).data == data


def test_redirect_loop_is_cut_off(fetcher, image_server):
    holder = {}

    def loop(request):
        send(request, 302, b"", {"Location": holder["url"]})

    holder["url"] = image_server.add_handler(loop)
    with pytest.raises(TooManyRedirects):
        fetcher.fetch(holder["url"])


def test_redirect_to_a_loopback_port_outside_the_allowlist_is_blocked(fetcher, image_server, outside_server):
    secret = outside_server.add(b"internal data")
    url = image_server.add(b"", status=302, headers={"Location": secret})
    with pytest.raises(BlockedAddress):
        fetcher.fetch(url)
    assert outside_server.hits_for(secret) == 0


def test_loopback_is_blocked_without_the_allowlist(outside_server):
    fetcher = HttpFetcher(guarded_pool(AddressPolicy(), 1), timeout_seconds=1, max_bytes=1000)
    url = outside_server.add(b"x")
    with pytest.raises(BlockedAddress):
        fetcher.fetch(url)
    assert outside_server.hits_for(url) == 0


def test_a_refusal_does_not_tell_the_uploader_which_address_the_host_has(outside_server):
    fetcher = HttpFetcher(guarded_pool(AddressPolicy(), 1), timeout_seconds=1, max_bytes=1000, retries=0)
    with pytest.raises(BlockedAddress) as failure:
        fetcher.fetch(f"http://localhost:{outside_server.port}/x")
    assert "'localhost' resolves to a non-public address" in failure.value.message
    assert "127.0.0.1" not in failure.value.message and "::1" not in failure.value.message


@pytest.mark.parametrize(
    "addresses",
    [
        ["93.184.215.14", "127.0.0.1"],
        ["127.0.0.1", "93.184.215.14"],
        ["2606:4700::1", "93.184.215.14", "::1"],
    ],
)
def test_a_host_resolving_to_a_public_and_a_private_address_is_blocked(monkeypatch, addresses):
    """Every address is checked, not the first: the connection may go to any of them.
    The resolver is the test's, so nothing is sent to the public addresses."""
    public = [a for a in addresses if is_public_address(ipaddress.ip_address(a))]
    answers = {"mixed.example": addresses, "public.example": public}

    def resolve(host, port, *args, **kwargs):
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(net_failures.BlockedAddress) as failure:
        AddressPolicy().resolve("mixed.example", 80, timeout=1)
    assert (
        str(failure.value) == failure.value.message == "host 'mixed.example' resolves to a non-public address"
    )
    resolved = AddressPolicy().resolve("public.example", 80, timeout=1)
    assert [info[4][0] for info in resolved] == answers["public.example"]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "2130706433",
        "127.1",
        "0x7f000001",
        "0177.0.0.1",
        "localhost",
        "0.0.0.0",
        "[::1]",
        "[::ffff:127.0.0.1]",
    ],
)
def test_loopback_spellings_are_blocked(outside_server, host):
    fetcher = HttpFetcher(guarded_pool(AddressPolicy(), 1), timeout_seconds=1, max_bytes=1000, retries=0)
    with pytest.raises((BlockedAddress, ConnectionFailed)) as failure:
        fetcher.fetch(f"http://{host}:{outside_server.port}/x")
    assert outside_server.hits["/x"] == 0
    if host not in ("0x7f000001", "0177.0.0.1"):  # resolvers differ on these spellings
        assert isinstance(failure.value, BlockedAddress)


@pytest.mark.parametrize(
    "address",
    [
        "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1",
        "0.0.0.0", "::", "::1", "fc00::1", "fe80::1", "ff02::1", "::ffff:10.0.0.1", "2002:7f00:1::1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        # NAT64, well-known prefix (RFC 6052): the embedded IPv4 decides.
        "64:ff9b::7f00:1", "64:ff9b::127.0.0.1", "64:ff9b::10.1.2.3", "64:ff9b::a9fe:a9fe",
        "64:ff9b::c0a8:101", "64:ff9b::", "64:ff9b::e000:1",
        # NAT64, local-use prefix (RFC 8215): a network-local translator, never public.
        "64:ff9b:1::7f00:1", "64:ff9b:1::808:808", "64:ff9b:1:ffff::1",
        # IPv4-compatible (deprecated ::/96).
        "::7f00:1", "::127.0.0.1", "::a01:203", "::a9fe:a9fe", "::2", "::ffff",
        # SIIT IPv4-translated (::ffff:0:0:0/96).
        "::ffff:0:7f00:1", "::ffff:0:127.0.0.1", "::ffff:0:a01:203", "::ffff:0:0:0",
        # Site-local (deprecated fec0::/10).
        "fec0::1", "fec0::7f00:1", "feff:ffff::1",
    ],
)  # fmt: skip
def test_ipv6_spellings_of_non_public_addresses_are_not_public(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "2606:2800:220:1:248:1893:25c8:1946",
        "64:ff9b::93.184.216.34",
        "64:ff9b::808:808",
        "::ffff:93.184.216.34",
        "::ffff:0:93.184.216.34",
        "::93.184.216.34",
    ],
)
def test_public_addresses_are_public(address):
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("host", ["::7f00:1", "64:ff9b::7f00:1", "::ffff:0:7f00:1", "fec0::1"])
def test_ipv6_spellings_of_loopback_are_blocked_before_connecting(outside_server, host):
    fetcher = HttpFetcher(guarded_pool(AddressPolicy(), 1), timeout_seconds=1, max_bytes=1000, retries=0)
    with pytest.raises(BlockedAddress):
        fetcher.fetch(f"http://[{host}]:{outside_server.port}/x")
    assert outside_server.hits["/x"] == 0


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "javascript:alert(1)",
        "data:image/png;base64,AAAA",
        "nohost",
    ],
)
def test_non_http_urls_are_refused(fetcher, url):
    with pytest.raises(InvalidUrl):
        fetcher.fetch(url)


def test_declared_oversize_body_is_refused(fetcher, image_server):
    with pytest.raises(TooLarge):
        fetcher.fetch(image_server.add(b"x" * 1_000_001))


def test_endless_stream_is_cut_off_at_the_byte_cap(fetcher, image_server):
    def endless(request):
        request.send_response(200)
        request.send_header("Content-Type", "image/jpeg")
        request.end_headers()
        chunk = b"\xff" * 65536
        for _ in range(1000):
            request.wfile.write(chunk)

    with pytest.raises(TooLarge):
        fetcher.fetch(image_server.add_handler(endless))


def test_gzip_bomb_is_cut_off_on_decoded_bytes(fetcher, image_server):
    bomb = gzip.compress(b"\0" * 50_000_000)
    url = image_server.add(bomb, headers={"Content-Encoding": "gzip"})
    assert len(bomb) < 1_000_000
    with pytest.raises(TooLarge):
        fetcher.fetch(url)


def silent(request):
    time.sleep(20)


@pytest.mark.parametrize(
    "handler",
    [dripping_body(), silent, dripping_headers()],
    ids=["body dripped a byte at a time", "silent server", "headers dripped a byte at a time"],
)
def test_slow_servers_are_cut_off_by_the_wall_clock_deadline(fetcher, image_server, handler):
    # Each server would take 20 s or more to answer: the 1.5 s deadline must end the fetch
    # first, and the dripping ones must see the connection dropped, not finish.
    fetcher.retries = 0
    observed_handler, run = observed(handler)
    with pytest.raises(UpstreamTimeout):
        fetcher.fetch(image_server.add_handler(observed_handler))
    assert not run.answered_in_full
    if handler is not silent:
        assert run.ended.wait(10) and not run.answered_in_full


def test_connection_refused_is_a_connection_error_that_says_so(image_server):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fetcher = HttpFetcher(
        guarded_pool(AddressPolicy(frozenset({("127.0.0.1", port)})), 1),
        timeout_seconds=1,
        max_bytes=1000,
        retry_backoff_seconds=0.01,
    )
    with pytest.raises(ConnectionFailed) as failure:
        fetcher.fetch(f"http://127.0.0.1:{port}/x")
    assert failure.value.transient  # the image waits for its origin (app/ledger)
    assert failure.value.message == "the connection was refused"


def test_pooled_connections_still_work_after_a_deadline_cut(fetcher, image_server):
    fetcher.retries = 0
    with pytest.raises(UpstreamTimeout):
        fetcher.fetch(image_server.add_handler(dripping_headers(length=100)))
    data = images.jpeg()
    for _ in range(3):
        assert fetcher.fetch(image_server.add(data)).data == data


def test_the_deadline_reaper_cuts_each_socket_at_its_deadline_and_spares_cancelled_ones():
    """The reaper on its own (a fresh one, its thread started by the first watch): sockets
    are shut down at their deadline and not before, in deadline order whatever the order
    they were watched in; a cancelled one and one whose deadline is far off stay open."""
    from app.net.guard import DeadlineReaper

    reaper = DeadlineReaper()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for ours, _theirs in pairs:
            ours.settimeout(10)
        (late, _), (early, _), (cancelled, cancelled_peer), (far, far_peer) = pairs
        now = time.monotonic()
        deadlines = {"late": now + 0.6, "early": now + 0.3}
        reaper.watch(far, now + 60)
        reaper.watch(late, deadlines["late"])
        token = reaper.watch(cancelled, now + 0.1)
        reaper.watch(early, deadlines["early"])
        reaper.cancel(token)

        cut_at = {}
        for name, sock in (("early", early), ("late", late)):
            assert sock.recv(1) == b""  # shut down: the blocked read wakes with end of stream
            cut_at[name] = time.monotonic()
        assert cut_at["early"] >= deadlines["early"] and cut_at["late"] >= deadlines["late"]

        # Both deadlines after the cancelled one's have passed: it was never cut.
        for sock, peer in ((cancelled, cancelled_peer), (far, far_peer)):
            peer.sendall(b"x")
            assert sock.recv(1) == b"x"
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()


def test_the_deadline_reaper_keeps_watching_after_it_ran_out_of_work_and_after_a_closed_socket():
    """Its thread outlives an empty watch list, and a socket its user closed before the
    deadline (shutting it down fails) does not stop it cutting the next one."""
    from app.net.guard import DeadlineReaper

    reaper = DeadlineReaper()
    closed, _closed_peer = pair_one = socket.socketpair()
    first, _ = pair_two = socket.socketpair()
    second, _ = pair_three = socket.socketpair()
    try:
        reaper.watch(closed, time.monotonic() + 0.1)
        closed.close()
        first.settimeout(5)
        reaper.watch(first, time.monotonic() + 0.2)
        assert first.recv(1) == b""
        reaper.cancel(reaper.watch(second, time.monotonic() + 0.1))
        time.sleep(0.3)  # the cancelled watch is dropped and nothing is left to watch
        second.settimeout(5)
        reaper.watch(second, time.monotonic() + 0.1)
        assert second.recv(1) == b""
    finally:
        for pair in (pair_one, pair_two, pair_three):
            for sock in pair:
                sock.close()
