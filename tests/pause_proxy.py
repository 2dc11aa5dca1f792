"""A TCP proxy that can go silent, as a network partition or a dead NAT entry does.

    proxy = PauseProxy(target_port=5672)   # listens on 127.0.0.1:<proxy.port>
    proxy.pause()    # stop forwarding both ways; every socket stays open, nothing is reset
    proxy.resume()   # forward again, what waited in the buffers first
    proxy.close()

Paused, the proxy reads nothing from either side: the kernel buffers fill, senders see their
writes accepted (then block), readers wait. No RST, no FIN: exactly what a partition looks like
to both ends. Only 127.0.0.0/8 targets (the tests' own RabbitMQ).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class PauseProxy:
    def __init__(self, target_port: int = 5672, target_host: str = "127.0.0.1") -> None:
        if not target_host.startswith("127."):
            raise ValueError("the pause proxy only forwards to 127.0.0.0/8")
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        self._lock = threading.Lock()
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, name="pause-proxy", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    @property
    def paused(self) -> bool:
        return not self._forwarding.is_set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setblocking(True)
        self._selector.register(client, selectors.EVENT_READ, upstream)
        self._selector.register(upstream, selectors.EVENT_READ, client)
        self.connections += 1

    def _drop(self, sock: socket.socket, peer: socket.socket) -> None:
        for s in (sock, peer):
            with contextlib.suppress(Exception):
                self._selector.unregister(s)
            with contextlib.suppress(Exception):
                s.close()

    def _serve(self) -> None:
        while not self._closed:
            if not self._forwarding.is_set():
                # Paused: accept nothing, read nothing, close nothing.
                self._forwarding.wait(0.1)
                continue
            for key, _ in self._selector.select(timeout=0.1):
                if not self._forwarding.is_set():
                    break
                if key.data is None:
                    self._accept()
                    continue
                sock, peer = key.fileobj, key.data
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                    if not data:
                        self._drop(sock, peer)
                        continue
                    peer.sendall(data)
                except OSError:
                    self._drop(sock, peer)
