"""A TCP relay on loopback between the app and the test PostgreSQL: the database host as
the app sees it, to lose on demand.

``cut()`` is what a primary that dies looks like from the API host: every connection
through the relay is closed (the server ends those sessions, and with them their advisory
locks), and new ones are refused until ``restore()`` (the promoted standby taking over,
here the same server: nothing committed is lost, as with synchronous replication).

``lose_answer(port, delay)`` is a COMMIT that reaches the server and whose answer never
comes back: the next COMMIT the app sends on its connection from ``port`` breaks that
connection at once, and is handed to the server ``delay`` seconds later (as a server
busy or a network slow to drain does), so the server commits it after the app saw its
connection break.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import sqlalchemy as sa


class DbRelay:
    def __init__(self, url: str) -> None:
        parsed = sa.engine.make_url(url)
        self.target = (parsed.host or "127.0.0.1", parsed.port or 5432)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.url = parsed.set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False
        )
        self.up = True
        self.closed = False
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.losing: dict[int, float] = {}  # the app's port -> delay (lose_answer)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((client, upstream))
            port = client.getpeername()[1]
            threading.Thread(target=self._pipe, args=(client, upstream, port), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, port: int | None = None) -> None:
        try:
            while data := source.recv(65536):
                if port in self.losing and b"COMMIT\x00" in data:
                    source.shutdown(socket.SHUT_RDWR)  # the app sees its connection break
                    time.sleep(self.losing.pop(port))
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def lose_answer(self, port: int, delay: float) -> None:
        """The next COMMIT from the app's ``port`` reaches the server ``delay`` seconds
        after its connection broke (the module's doc)."""
        self.losing[port] = delay

    def cut(self) -> None:
        """The database host is gone: every connection closed, new ones refused."""
        self.up = False
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for end in pair:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()
