"""A small RFB (VNC) client for the console tests: the handshake, VNC authentication and
the server's framebuffer size, over a plain TCP socket or a websocket (the console
proxy). RFC 6143; DES from pycryptodome (VNC's challenge-response is DES with the
password's bits mirrored)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from Crypto.Cipher import DES

VNC_AUTH = 2


class VncRefused(Exception):
    """The server refused the login; ``reason`` is what it said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class ServerInit:
    width: int
    height: int
    name: str


def vnc_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: the challenge DES-encrypted with the password as key, each
    key byte's bits reversed (as every VNC server expects)."""
    key = password.encode("latin-1")[:8].ljust(8, b"\0")
    mirrored = bytes(int(f"{byte:08b}"[::-1], 2) for byte in key)
    return DES.new(mirrored, DES.MODE_ECB).encrypt(challenge)


class TcpTransport:
    def __init__(self, host: str, port: int, timeout: float = 30) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)

    def recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class WebSocketTransport:
    """Binary frames of a websocket-client connection (as noVNC speaks to websockify)."""

    def __init__(self, ws) -> None:
        self.ws = ws

    def recv(self) -> bytes:
        data = self.ws.recv()
        if not data:
            raise ConnectionError("the proxy closed the websocket")
        return data if isinstance(data, bytes) else data.encode()

    def send(self, data: bytes) -> None:
        self.ws.send_binary(data)

    def close(self) -> None:
        self.ws.close()


class RfbClient:
    def __init__(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self.transport.recv()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def greeting(self) -> bytes:
        """The server's ProtocolVersion, e.g. ``b"RFB 003.008\\n"``."""
        return self.read(12)

    def login(self, password: str) -> ServerInit:
        """Version 3.8, VNC authentication, ClientInit (shared): the server's size and name.
        Raises :class:`VncRefused` when the password is refused."""
        self.transport.send(b"RFB 003.008\n")
        count = self.read(1)[0]
        if count == 0:
            raise VncRefused(self._reason())
        types = self.read(count)
        if VNC_AUTH not in types:
            raise AssertionError(f"the server does not offer VNC authentication: {list(types)}")
        self.transport.send(bytes([VNC_AUTH]))
        challenge = self.read(16)
        self.transport.send(vnc_response(password, challenge))
        (result,) = struct.unpack(">I", self.read(4))
        if result != 0:
            raise VncRefused(self._reason())
        self.transport.send(b"\x01")  # ClientInit: share the display
        width, height = struct.unpack(">HH", self.read(4))
        self.read(16)  # pixel format
        (length,) = struct.unpack(">I", self.read(4))
        return ServerInit(width, height, self.read(length).decode("utf-8", "replace"))

    def _reason(self) -> str:
        (length,) = struct.unpack(">I", self.read(4))
        return self.read(length).decode("utf-8", "replace")

    def close(self) -> None:
        self.transport.close()
