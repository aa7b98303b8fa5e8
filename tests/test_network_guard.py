"""The network guard (app/net/guard.py) on its own: the allowlist, the address check, the
guarded connections of the download pool and the webhook session, and the fetch deadline
on one connection. Each test is quick: under `make mutate` these run before the tests that
reach the guard through the fetcher or the service (docs/mutation.md)."""

import http.client
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app.net.failures import BlockedAddress
from app.net.guard import (
    USER_AGENT,
    AddressPolicy,
    DeadlineReaper,
    guarded_pool,
    guarded_session,
    parse_allowlist,
    wall_clock_deadline,
)
from tests.support.servers import LocalServer, send


@pytest.fixture(scope="module")
def server():
    with LocalServer() as local:
        yield local


@pytest.fixture(scope="module")
def outside_server():
    """A loopback server no policy of these tests allows: it must never be reached."""
    with LocalServer() as local:
        yield local


@pytest.fixture
def silent_port():
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def allowing(*ports: int) -> AddressPolicy:
    return AddressPolicy(frozenset(("127.0.0.1", port) for port in ports))


def connection(policy: AddressPolicy, port: int, timeout: float = 3.0):
    """A connection of the download pool's own class for 127.0.0.1:port, not yet open."""
    pool = guarded_pool(policy, pool_size=1).connection_from_host("127.0.0.1", port)
    return pool.ConnectionCls("127.0.0.1", port, timeout=timeout)


def test_an_allowlist_is_host_port_pairs_lower_cased_with_ipv6_unbracketed():
    assert parse_allowlist(" LocalHost:8080, ,[::1]:9000,127.0.0.1:1,") == {
        ("localhost", 8080),
        ("::1", 9000),
        ("127.0.0.1", 1),
    }
    assert parse_allowlist("") == frozenset()


@pytest.mark.parametrize("entry", ["localhost", "localhost:", ":8080", "[::1]"])
def test_an_allowlist_entry_without_a_host_or_a_port_is_refused(entry):
    with pytest.raises(ValueError, match="is not host:port"):
        parse_allowlist(f"127.0.0.1:80,{entry}")


def test_an_allowlisted_host_resolves_to_stream_addresses_on_its_port_whatever_its_case():
    """The allowlist lets a private host through; what comes back is what a TCP connection
    needs (no datagram or raw entries), each on the port asked for."""
    infos = AddressPolicy(parse_allowlist("localhost:8080")).resolve("LocalHost", 8080, timeout=1)
    assert infos
    assert {(info[1], info[4][1]) for info in infos} == {(socket.SOCK_STREAM, 8080)}
    with pytest.raises(BlockedAddress):
        AddressPolicy(parse_allowlist("localhost:8080")).resolve("localhost", 8081, timeout=1)


def test_a_connection_goes_to_the_allowed_address_with_its_timeout_and_without_nagle(server):
    conn = connection(allowing(server.port), server.port, timeout=2.5)
    conn.connect()
    try:
        assert conn.sock.getpeername() == ("127.0.0.1", server.port)
        assert conn.sock.gettimeout() == 2.5
        assert conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        conn.close()


def test_a_connection_to_a_port_outside_the_allowlist_is_refused_before_connecting(server, outside_server):
    conn = connection(allowing(server.port), outside_server.port)
    with pytest.raises(BlockedAddress):
        conn.connect()
    assert conn.sock is None


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_pool_and_the_session_check_the_address_for_http_and_https(outside_server, scheme):
    """Unguarded, an https request would reach the server (and fail its TLS handshake)."""
    url = f"{scheme}://127.0.0.1:{outside_server.port}/x"
    with pytest.raises(BlockedAddress):
        guarded_pool(AddressPolicy(), pool_size=1).request("GET", url, retries=False, timeout=2)
    with pytest.raises(BlockedAddress):
        guarded_session(AddressPolicy(), pool_size=1).get(url, timeout=2)
    assert outside_server.hits.get("/x", 0) == 0


def test_the_session_names_the_service_ignores_proxy_settings_and_sends_each_request_once(
    server, outside_server, monkeypatch
):
    """A proxy from the environment would take the request past the address policy; a
    retry of its own would send a request the caller (the deliverer) did not decide to."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", outside_server.base_url)
    monkeypatch.setenv("http_proxy", outside_server.base_url)
    seen = []

    def answer(request):
        seen.append(request.headers["User-Agent"])
        send(request, 200, b"ok")

    def hang_up(request):
        request.close_connection = True

    session = guarded_session(allowing(server.port), pool_size=1)
    assert session.get(server.add_handler(answer), timeout=2).content == b"ok"
    assert seen == [USER_AGENT]
    dropped = server.add_handler(hang_up)
    with pytest.raises(requests.ConnectionError):
        session.get(dropped, timeout=2)
    assert server.hits_for(dropped) == 1
    assert sum(outside_server.hits.values()) == 0


def test_a_response_read_inside_a_deadline_is_cut_off_at_it(server, silent_port):
    """The socket's own timeout is seconds away: only the deadline's shutdown ends the read
    with the connection closed (a timeout would raise TimeoutError)."""
    conn = connection(allowing(silent_port), silent_port, timeout=3)
    conn.request("GET", "/x")
    with wall_clock_deadline(time.monotonic() + 0.1), pytest.raises(http.client.RemoteDisconnected):
        conn.getresponse()
    conn.close()


def test_a_response_read_after_its_deadline_block_is_not_cut_and_one_outside_any_block_is_not_watched(
    server, silent_port
):
    """Leaving the block cancels its watch: the keep-alive connection is still whole after
    the deadline has passed. Proved by a later deadline on another connection, cut after
    it (the reaper cuts in deadline order). A thread that never entered a block reads as
    usual."""
    url = server.add(b"kept")
    path = url.removeprefix(server.base_url)
    conn = connection(allowing(server.port, silent_port), server.port)
    deadline = time.monotonic() + 0.1
    with wall_clock_deadline(deadline):
        conn.request("GET", path)
        assert conn.getresponse().data == b"kept"
    later = connection(allowing(silent_port), silent_port)
    later.request("GET", "/x")
    with wall_clock_deadline(deadline + 0.1), pytest.raises(http.client.RemoteDisconnected):
        later.getresponse()
    later.close()
    conn.request("GET", path)
    assert conn.getresponse().data == b"kept"

    def outside_any_block():
        conn.request("GET", path)
        return conn.getresponse().data

    with ThreadPoolExecutor(1) as thread:
        assert thread.submit(outside_any_block).result(timeout=5) == b"kept"
    conn.close()


def test_the_deadline_reapers_thread_is_a_daemon_named_for_thread_dumps():
    """It never ends: as a daemon it does not hold the process at exit. Its name is what a
    thread dump (py-spy, faulthandler) shows."""
    before = set(threading.enumerate())
    reaper = DeadlineReaper()
    ours, theirs = socket.socketpair()
    try:
        reaper.cancel(reaper.watch(ours, time.monotonic() + 60))
        [thread] = set(threading.enumerate()) - before
        assert (thread.name, thread.daemon) == ("fetch-deadlines", True)
    finally:
        ours.close()
        theirs.close()


def test_a_new_earliest_deadline_wakes_the_reaper_waiting_for_a_later_one():
    """The reaper sleeps until its earliest deadline; one watched meanwhile that comes
    sooner must wake it. The first cut is the signal that it sleeps for the far one."""
    reaper = DeadlineReaper()
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        (far, _), (first, _), (near, _) = pairs
        first.settimeout(5)
        near.settimeout(5)
        reaper.watch(far, time.monotonic() + 60)
        reaper.watch(first, time.monotonic() + 0.05)
        assert first.recv(1) == b""
        reaper.watch(near, time.monotonic() + 0.05)
        assert near.recv(1) == b""
    finally:
        for pair in pairs:
            for sock in pair:
                sock.close()
