"""A real S3 endpoint for the tests: moto's server as a subprocess on 127.0.0.1, and a TCP
proxy in front of it that can be paused to make the endpoint look down.

moto keeps its buckets in memory, so an outage is simulated by pausing the proxy rather
than stopping moto.
"""

import contextlib
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from tests.support.service_process import free_port

TEST_REGION = "us-east-1"
# Dummy credentials: moto accepts any, and a client built with these can reach nothing real.
TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": TEST_REGION,
}


class MotoServer:
    """`python -m moto.server` on 127.0.0.1 and a free port; stopped by its PID."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "MotoServer":
        log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **TEST_CREDENTIALS},
            stdout=log,
            stderr=log,
        )
        http = requests.Session()
        http.trust_env = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto exited with {self.process.returncode}; see {self.log_path}")
            try:
                if http.get(f"{self.endpoint_url}/moto-api/", timeout=1).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto did not answer within {timeout} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "MotoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PausableTcpProxy:
    """Forwards 127.0.0.1:<port> to a target; `pause()` makes the endpoint look down.

    While paused the port is closed (connecting is refused) and every open connection has
    been reset; `resume()` listens on the same port again.
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int | None = None):
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._stop_accepting = threading.Event()
        self._accept_thread: threading.Thread | None = None

    @property
    def paused(self) -> bool:
        return self._listener is None

    def resume(self) -> None:
        if not self.paused:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._stop_accepting = threading.Event()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, args=(listener, self._stop_accepting), daemon=True
        )
        self._accept_thread.start()

    def pause(self) -> None:
        if self.paused:
            return
        self._stop_accepting.set()
        assert self._accept_thread is not None
        self._accept_thread.join()
        assert self._listener is not None
        self._listener.close()
        self._listener = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            _reset(connection)

    start = resume
    close = pause

    def __enter__(self) -> "PausableTcpProxy":
        self.resume()
        return self

    def __exit__(self, *exc) -> None:
        self.pause()

    def _accept_loop(self, listener: socket.socket, stop: threading.Event) -> None:
        # Polls rather than blocking in accept(): closing a socket from another thread does
        # not reliably wake a thread blocked on it.
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not stop.is_set():
                if not selector.select(timeout=0.05):
                    continue
                try:
                    client, _ = listener.accept()
                except OSError:
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    _reset(client)
                    continue
                with self._lock:
                    self._connections.update((client, upstream))
                threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        replies = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        replies.start()
        _pump(client, upstream)
        for connection in (client, upstream):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        replies.join()
        with self._lock:
            self._connections.difference_update((client, upstream))
        client.close()
        upstream.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _reset(connection: socket.socket) -> None:
    """Close with RST, as a crashed endpoint would, and wake any thread reading it."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # SHUT_RD wakes a thread blocked reading the socket without sending anything; close()
    # with a zero linger then sends the RST.
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RD)
    connection.close()
