"""The test helper that plays a partition: paused, nothing passes either way and nothing is
closed; resumed, what waited is delivered."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from tests.pause_proxy import PauseProxy


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_paused_nothing_passes_and_nothing_is_closed_then_it_flows_again(echo_port: int) -> None:
    proxy = PauseProxy(echo_port)
    try:
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
        client.sendall(b"ping")
        assert client.recv(16) == b"ping"
        proxy.pause()
        client.sendall(b"lost?")  # accepted by the kernel, as on a partitioned network
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(16)  # no answer, no reset, no end of stream
        proxy.resume()
        client.settimeout(2)
        assert client.recv(16) == b"lost?"
        client.close()
    finally:
        proxy.close()


def test_only_loopback_targets() -> None:
    with pytest.raises(ValueError, match="127"):
        PauseProxy(5672, "10.0.0.1")
