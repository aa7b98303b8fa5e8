"""Outbound HTTP to addresses the caller does not control: image downloads and webhooks.

Every URL comes from someone we don't trust. Before any byte is sent:
- the scheme must be http(s) with a host (app/net/urls.py, also used by the CSV parser);
- the host is resolved here and every address is checked against AddressPolicy, and the
  socket connects to the address that passed the check (no DNS-rebinding gap);
- every response read inside `wall_clock_deadline` is cut off at that deadline, however
  slowly the server sends.
"""

import contextlib
import heapq
import ipaddress
import itertools
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from app.net.failures import BlockedAddress, ConnectionFailed, UnknownHost

USER_AGENT = "batch-image-service/1.0"


def parse_allowlist(entries: str) -> frozenset[tuple[str, int]]:
    """'host:port,host:port' -> {(host, port)}; hosts lowercased, IPv6 in brackets."""
    allowed = set()
    for entry in filter(None, (e.strip() for e in entries.split(","))):
        parts = urlsplit(f"//{entry}")
        if not parts.hostname or parts.port is None:
            raise ValueError(f"allowlist entry {entry!r} is not host:port")
        allowed.add((parts.hostname.lower(), parts.port))
    return frozenset(allowed)


# IPv6 ranges whose last 32 bits are an IPv4 address the packet ends up at: NAT64's
# well-known prefix, SIIT's IPv4-translated addresses and the deprecated IPv4-compatible
# ones. Python's is_global judges them by the IPv6 prefix alone, so ::7f00:1 would pass.
_EMBEDDING_IPV4_LAST = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
# Never public whatever they embed: NAT64's local-use prefix translates inside one network
# (and where the IPv4 sits in it depends on that network's prefix length), and site-local
# addresses are deprecated but still routed inside a site.
_NEVER_PUBLIC_IPV6 = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("fec0::/10"),
)


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the IPv4 spellings."""
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is not None:
        return embedded
    if any(address in network for network in _EMBEDDING_IPV4_LAST):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally reachable unicast address; IPv4 written as IPv6 is judged as IPv4."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
        if address.teredo is not None or any(address in network for network in _NEVER_PUBLIC_IPV6):
            return False
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class AddressPolicy:
    """Which hosts may be contacted: public addresses, plus an explicit host:port allowlist."""

    allowed_private: frozenset[tuple[str, int]] = frozenset()

    def resolve(self, host: str, port: int, timeout: float | None) -> list[tuple]:
        """Resolve host and return connectable addrinfo entries, or raise BlockedAddress."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_NONAME:
                raise UnknownHost(f"cannot resolve host {host!r}: {exc}") from exc
            raise ConnectionFailed(f"cannot resolve host {host!r}: {exc}") from exc
        except UnicodeError as exc:
            raise ConnectionFailed(f"cannot resolve host {host!r}: {exc}") from exc
        if (host.lower().strip("[]"), port) in self.allowed_private:
            return infos
        for info in infos:
            address = ipaddress.ip_address(info[4][0].split("%")[0])
            if not is_public_address(address):
                raise BlockedAddress(f"host {host!r} resolves to a non-public address")
        return infos


class DeadlineReaper:
    """Shuts a socket down when the fetch using it runs past its wall-clock deadline.

    Socket timeouts apply to one read at a time, so a server that sends its status line
    and headers a byte at a time would hold a fetch for ever; shutting the socket down
    wakes the blocked read from another thread."""

    def __init__(self):
        self._heap: list[tuple[float, int, socket.socket]] = []
        self._cancelled: set[int] = set()
        self._tokens = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, sock: socket.socket, deadline: float) -> int:
        token = next(self._tokens)
        with self._wake:
            heapq.heappush(self._heap, (deadline, token, sock))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fetch-deadlines", daemon=True)
                self._thread.start()
            # The reaper sleeps until the earliest deadline: only a new earliest one
            # changes when it must wake (a fetch a time would otherwise wake it twice).
            if self._heap[0][1] == token:
                self._wake.notify()
        return token

    def cancel(self, token: int) -> None:
        with self._wake:
            self._cancelled.add(token)

    def _run(self) -> None:
        with self._wake:
            while True:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._wake.wait()
                    continue
                deadline, _token, sock = self._heap[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wake.wait(remaining)
                    continue
                heapq.heappop(self._heap)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


_reaper = DeadlineReaper()
_fetch_scope = threading.local()


@contextlib.contextmanager
def wall_clock_deadline(deadline: float):
    """Every response read by this thread inside the block is cut off at deadline."""
    _fetch_scope.deadline = deadline
    _fetch_scope.tokens = []
    try:
        yield
    finally:
        for token in _fetch_scope.tokens:
            _reaper.cancel(token)
        _fetch_scope.deadline = None
        _fetch_scope.tokens = []


def _watch_deadline(connection: HTTPConnection) -> None:
    deadline = getattr(_fetch_scope, "deadline", None)
    if deadline is not None and connection.sock is not None:
        _fetch_scope.tokens.append(_reaper.watch(connection.sock, deadline))


class _GuardedConnection:
    """Connection behaviour shared by the HTTP and HTTPS classes: connect only to an
    address the policy allows, and put every response under the fetch's deadline."""

    address_policy: AddressPolicy

    def _new_conn(self) -> socket.socket:
        infos = self.address_policy.resolve(self._dns_host, self.port, self.timeout)
        last_error: OSError | None = None
        for family, socktype, proto, _name, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self.timeout is not None:
                    sock.settimeout(self.timeout)
                sock.connect(sockaddr)
                return sock
            except TimeoutError as exc:
                sock.close()
                raise ConnectTimeoutError(self, f"connect to {self.host} timed out") from exc
            except OSError as exc:
                sock.close()
                last_error = exc
        # Chained, so the fetcher can name the cause (app/pipeline/fetch.py _connection_message).
        raise NewConnectionError(self, f"failed to connect to {self.host}: {last_error}") from last_error

    def getresponse(self, *args, **kwargs):
        _watch_deadline(self)
        return super().getresponse(*args, **kwargs)


def _guarded_pool_classes(policy: AddressPolicy) -> dict[str, type]:
    class GuardedHTTPConnection(_GuardedConnection, HTTPConnection):
        address_policy = policy

    class GuardedHTTPSConnection(_GuardedConnection, HTTPSConnection):
        address_policy = policy

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

    return {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}


def guarded_pool(policy: AddressPolicy, pool_size: int) -> urllib3.PoolManager:
    """Pooled connections for image downloads, every one through the address policy.
    Downloads use urllib3 directly: requests' per-call work (preparing, merging settings,
    hooks) held the GIL for about half a millisecond an image, time the decoders wait for."""
    pool = urllib3.PoolManager(num_pools=pool_size, maxsize=pool_size, retries=False)
    pool.pool_classes_by_scheme = _guarded_pool_classes(policy)
    return pool


def guarded_session(policy: AddressPolicy, pool_size: int) -> requests.Session:
    """A pooled requests.Session whose every connection passes the address policy."""
    pool_classes = _guarded_pool_classes(policy)

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pool_classes

    session = requests.Session()
    # No proxies or .netrc from the environment: they would bypass the address policy.
    session.trust_env = False
    session.headers["User-Agent"] = USER_AGENT
    adapter = GuardedAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
