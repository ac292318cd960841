"""A TCP relay from the hub address of the test hosts to PostgreSQL on loopback, with latency.

PostgreSQL on this machine listens on 127.0.0.1 only, which the namespaced hosts cannot
reach; the relay listens on the bridge's address and copies bytes both ways, so that the
hosts see a database server "on the network". Each direction of each connection is a FIFO
delay line: what arrives is sent on ``delay_s`` later (0 by default), which adds twice that to
every round trip between a worker and the database, like a WAN link (this kernel has no
netem; see ``net.py``). Nothing else changes in between: a partition or packet loss on a
host's link is all the workers see, and a host's closed connection closes the server's side.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from contextlib import suppress

CHUNK = 64 * 1024


class Relay:
    """Listens on ``listen`` (address, port) and relays every connection to ``target``."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(listen)
        self.delay_s = 0.0  # one way; may change while connections are open
        self.connections = 0  # accepted so far
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="relay-accept", daemon=True)

    def __enter__(self) -> Relay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        with self._lock:
            for sock in list(self._open):
                with suppress(OSError):
                    sock.close()
        self._thread.join(timeout=5)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            self.connections += 1
            with self._lock:
                self._open.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                line: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(source, line), name="relay-read", daemon=True).start()
                threading.Thread(target=self._write, args=(line, source, sink), name="relay-write",
                                 daemon=True).start()

    def _read(self, source: socket.socket, line: queue.Queue[tuple[float, bytes]]) -> None:
        try:
            while data := source.recv(CHUNK):
                line.put((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        line.put((time.monotonic() + self.delay_s, b""))  # the end, delayed like the data before it

    def _write(self, line: queue.Queue[tuple[float, bytes]], source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                due, data = line.get()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        # One side ended: end both, as a direct connection would.
        for sock in (source, sink):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with self._lock:
                self._open.discard(sock)
