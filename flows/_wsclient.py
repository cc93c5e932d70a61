"""A websocket client (RFC 6455) for stream sources: h11 for the HTTP
upgrade, frames read and written here.

Why not trio-websocket: it hands each message through a reader task and a
memory channel (a scheduler round per message) and parses frames with
wsproto in pure Python; together they capped a Binance trade stream near
13k messages/s on one core (``bench/streams.py``). Here the caller's task
reads the socket itself, and ``receive_messages`` returns every message of
one read at once, so a read of 64 KiB (~400 market-data messages) costs one
cancel scope and one scheduler round.

What the client does (the client half of RFC 6455, no extensions):

- connects over TCP or TLS (``wss://``, system trust store), sends the
  upgrade request, checks ``101`` and ``Sec-WebSocket-Accept``; any other
  answer raises ``ConnectionRejected`` (status, headers, start of the body);
- reads text and binary messages, fragmented or not, as ``bytes`` (text is
  UTF-8; msgspec and ``json`` decode bytes directly);
- answers pings with pongs, ignores pongs, answers a close frame with a
  close frame and raises ``ConnectionClosed(code, reason)``;
- closes with 1002 on a protocol error (a masked or reserved-bit frame, an
  unknown opcode, a bad control or continuation frame) and with 1009 on a
  message over ``max_message_size``, raising ``ConnectionClosed`` with
  ``local=True``;
- a connection that ends without a close frame raises
  ``ConnectionClosed(1006)``.

Sends (masked, as clients must) are serialised by a lock, so a heartbeat
task and the reading task may share a connection, and each frame is sent
shielded from cancellation (bounded by ``close_timeout``): a send cut off
mid-frame would corrupt the stream, so a timeout around a send makes it
late, never partial.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import h11
import trio

__all__ = [
    "ConnectionClosed",
    "ConnectionRejected",
    "HandshakeError",
    "WebSocket",
    "open_ws",
    "split_ws_url",
]

Message = str | bytes

RECEIVE_SIZE = 65536
"""Bytes asked of the socket per read."""

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_REJECT_BODY = 4096


class HandshakeError(OSError):
    """The websocket upgrade failed (a bad or missing answer)."""


class ConnectionRejected(HandshakeError):
    """The server answered the upgrade with something other than 101."""

    def __init__(self, status_code: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(f"websocket upgrade rejected: HTTP {status_code}: {body[:200]!r}")
        self.status_code, self.headers, self.body = status_code, headers, body


class ConnectionClosed(Exception):
    """The connection is over: ``code`` from the close frame (1005 when it
    had none, 1006 when the connection dropped without one); ``local``: this
    side closed it (a protocol error, a message too large, ``aclose``)."""

    def __init__(self, code: int, reason: str = "", *, local: bool = False) -> None:
        super().__init__(f"websocket closed: {code} {reason}".rstrip())
        self.code, self.reason, self.local = code, reason, local


class WebSocket:
    """An open client connection (made by ``open_ws``)."""

    def __init__(self, stream: trio.abc.Stream, buffered: bytes, *,
                 max_message_size: int = 1 << 20, close_timeout: float = 2.0) -> None:
        self._stream = stream
        self._buf = bytearray(buffered)
        self._fragments: list[bytes] = []
        self._fragment_size = 0
        self._pending_control: list[tuple[int, bytes]] = []
        self._protocol_error: tuple[int, str] | None = None
        self._ready: list[bytes] = []
        self._send_lock = trio.Lock()
        self.max_message_size = max_message_size
        self.close_timeout = close_timeout
        self.closed: ConnectionClosed | None = None

    # -- receiving ---------------------------------------------------------------

    async def receive_messages(self) -> list[bytes]:
        """Every complete message already read, or, when there is none, what
        the next read(s) of the socket complete: never an empty list. Raises
        ``ConnectionClosed`` once the connection is over (after the messages
        that came before the close)."""
        if self._ready:
            ready, self._ready = self._ready, []
            return ready
        while True:
            if self.closed is not None:
                raise self.closed
            messages = self._split()
            if self._pending_control or self._protocol_error:
                await self._answer_control()
            if messages:
                return messages
            if self.closed is not None:
                raise self.closed
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.closed = ConnectionClosed(1006, "connection lost")
                raise self.closed
            self._buf += data

    async def get_message(self) -> bytes:
        """One message (``receive_messages`` for callers that want them one
        at a time; the rest stay buffered)."""
        if not self._ready:
            self._ready = await self.receive_messages()
        return self._ready.pop(0)

    def _split(self) -> list[bytes]:
        """Cut the complete frames off the buffer: data messages returned,
        control frames queued for ``_answer_control``."""
        buf = self._buf
        size = len(buf)
        at = 0
        out: list[bytes] = []
        view = memoryview(buf)  # payloads copied once, not sliced then copied
        try:
            at = self._split_frames(buf, view, size, out)
        finally:
            view.release()  # (the buffer cannot shrink while a view is held)
        del buf[:at]
        return out

    def _split_frames(self, buf: bytearray, view: memoryview, size: int, out: list[bytes]
                      ) -> int:
        """Append the complete frames' messages to ``out``; where they end."""
        at = 0
        while size - at >= 2:
            b0, b1 = buf[at], buf[at + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - at < 4:
                    break
                length, head = int.from_bytes(buf[at + 2 : at + 4], "big"), 4
            elif length == 127:
                if size - at < 10:
                    break
                length, head = int.from_bytes(buf[at + 2 : at + 10], "big"), 10
            if b1 & 0x80 or b0 & 0x70:
                self._fail(1002, "masked frame from the server" if b1 & 0x80
                           else "reserved bits set (no extension was negotiated)")
                break
            if length > self.max_message_size:
                self._fail(1009, f"frame of {length} bytes")
                break
            end = at + head + length
            if size < end:
                break
            opcode = b0 & 0x0F
            if b0 & 0x80 and not self._fragments and opcode in (_TEXT, _BINARY):
                out.append(bytes(view[at + head : end]))  # the common case
            elif not self._frame(b0, opcode, bytes(view[at + head : end]), out):
                return end
            at = end
        return at

    def _frame(self, b0: int, opcode: int, payload: bytes, out: list[bytes]) -> bool:
        """Any frame but an unfragmented data frame; False: stop reading."""
        fin = bool(b0 & 0x80)
        if opcode >= 0x8:
            if not fin or len(payload) > 125 or opcode not in (_CLOSE, _PING, _PONG):
                self._fail(1002, f"bad control frame (opcode {opcode:#x})")
                return False
            if opcode == _PONG:
                return True
            self._pending_control.append((opcode, payload))
            return opcode != _CLOSE
        if opcode in (_TEXT, _BINARY) and self._fragments:
            self._fail(1002, "new message inside a fragmented one")
            return False
        if opcode == 0 and not self._fragments:
            self._fail(1002, "continuation frame without a message")
            return False
        if opcode not in (0, _TEXT, _BINARY):
            self._fail(1002, f"unknown opcode {opcode:#x}")
            return False
        self._fragment_size += len(payload)
        if self._fragment_size > self.max_message_size:
            self._fail(1009, f"message over {self.max_message_size} bytes")
            return False
        self._fragments.append(payload)
        if fin:
            out.append(b"".join(self._fragments))
            self._fragments, self._fragment_size = [], 0
        return True

    def _fail(self, code: int, why: str) -> None:
        """A protocol error: close with ``code`` (sent by ``_answer_control``)."""
        self._protocol_error = self._protocol_error or (code, why)

    async def _answer_control(self) -> None:
        controls, self._pending_control = self._pending_control, []
        for opcode, payload in controls:
            if opcode == _PING:
                await self._send_frame(_PONG, payload, ignore_closed=True)
            elif opcode == _CLOSE:
                code, reason = _close_payload(payload)
                # echo the code (1005/1006 must not be sent: answer 1000)
                echo = code if code not in (1005, 1006, 1015) else 1000
                await self._send_frame(_CLOSE, echo.to_bytes(2, "big"), ignore_closed=True)
                self.closed = ConnectionClosed(code, reason)
                return
        if self._protocol_error is not None:
            code, why = self._protocol_error
            await self._send_frame(_CLOSE, code.to_bytes(2, "big") + why.encode()[:120],
                                   ignore_closed=True)
            self.closed = ConnectionClosed(code, why, local=True)

    # -- sending -------------------------------------------------------------------

    async def send_message(self, message: Message) -> None:
        """Send a text (``str``) or binary (``bytes``) message; raises
        ``ConnectionClosed`` when the connection is over."""
        if self.closed is not None:
            raise self.closed
        if isinstance(message, str):
            await self._send_frame(_TEXT, message.encode())
        else:
            await self._send_frame(_BINARY, bytes(message))

    async def ping(self, payload: bytes = b"") -> None:
        """Send a protocol ping (the answer is read and ignored)."""
        await self._send_frame(_PING, payload)

    async def _send_frame(self, opcode: int, payload: bytes, *, ignore_closed: bool = False
                          ) -> None:
        data = encode_frame(opcode, payload, mask=os.urandom(4))
        broken = False
        async with self._send_lock:
            # A cancelled send_all may leave half a frame on the wire, so a
            # frame is sent shielded, for at most close_timeout seconds;
            # one that does not go out in time breaks the connection.
            deadline = trio.current_time() + self.close_timeout
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    broken = True
            broken = broken or scope.cancelled_caught
        if broken:
            self.closed = self.closed or ConnectionClosed(1006, "connection lost")
            if not ignore_closed:
                raise self.closed from None

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """The close handshake (bounded by ``close_timeout``), then the socket."""
        deadline = trio.current_time() + self.close_timeout
        with trio.CancelScope(shield=True, deadline=deadline):
            if self.closed is None:
                self.closed = ConnectionClosed(code, reason, local=True)
                await self._send_frame(
                    _CLOSE, code.to_bytes(2, "big") + reason.encode()[:120], ignore_closed=True)
                await self._wait_for_close()
        await trio.aclose_forcefully(self._stream)

    async def _wait_for_close(self) -> None:
        """Read until the server's close frame or the end of the stream."""
        while True:
            try:
                data = await self._stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            self._buf += data
            self._split()
            if self._protocol_error or any(op == _CLOSE for op, _ in self._pending_control):
                return
            self._pending_control.clear()


def encode_frame(opcode: int, payload: bytes, *, mask: bytes | None = None) -> bytes:
    """One final frame; ``mask`` (4 bytes) for client frames, None for server frames."""
    n = len(payload)
    bit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes((0x80 | opcode, bit | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


def _close_payload(payload: bytes) -> tuple[int, str]:
    if len(payload) < 2:
        return 1005, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")


# -- connecting ---------------------------------------------------------------------


@asynccontextmanager
async def open_ws(
    url: str,
    *,
    connect_timeout: float = 10.0,
    close_timeout: float = 2.0,
    max_message_size: int = 1 << 20,
    headers: dict[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[WebSocket]:
    """A websocket connection to ``url`` (``ws://`` or ``wss://``), closed
    (close handshake, then the socket) however the block ends. Raises
    ``TimeoutError`` when connecting takes longer than ``connect_timeout``,
    ``OSError`` when it fails (``ConnectionRejected`` / ``HandshakeError``
    for a bad upgrade answer)."""
    host, port, host_header, resource, secure = split_ws_url(url)
    stream: Any = None
    try:
        with trio.fail_after(connect_timeout):
            if secure:
                stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl_context or ssl.create_default_context(),
                    https_compatible=True,
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
            buffered = await _handshake(stream, host_header, resource, headers or {})
    except trio.TooSlowError:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise TimeoutError(f"no websocket connection to {url} within {connect_timeout}s") from None
    except trio.BrokenResourceError as exc:  # a reset, or TLS failed (an untrusted certificate)
        await trio.aclose_forcefully(stream)
        raise HandshakeError(f"connecting to {url} failed: {exc.__cause__ or exc!r}") from exc
    except BaseException:
        if stream is not None:
            await trio.aclose_forcefully(stream)
        raise
    ws = WebSocket(stream, buffered, max_message_size=max_message_size,
                   close_timeout=close_timeout)
    try:
        yield ws
    finally:
        await ws.aclose()


async def _handshake(stream: Any, host_header: str, resource: str,
                     extra: dict[str, str]) -> bytes:
    """Send the upgrade request, check the answer; the bytes read past it."""
    key = base64.b64encode(os.urandom(16)).decode()
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=resource, headers=[
        ("Host", host_header), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13"),
        ("User-Agent", "flows/0.1"), *extra.items(),
    ])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.InformationalResponse) and event.status_code == 101:
                _check_accept(event.headers, key)
                return conn.trailing_data[0]
            elif isinstance(event, h11.Response):
                body = await _rejected_body(conn, stream)
                raise ConnectionRejected(event.status_code, list(event.headers), body)
            elif isinstance(event, h11.ConnectionClosed):
                raise HandshakeError("the server closed the connection during the upgrade")
    except h11.RemoteProtocolError as exc:
        raise HandshakeError(f"bad answer to the websocket upgrade: {exc}") from None


def _check_accept(headers: Any, key: str) -> None:
    fields = {name.lower(): value for name, value in headers}
    want = base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest())
    if fields.get(b"sec-websocket-accept") != want:
        raise HandshakeError("the server's Sec-WebSocket-Accept does not match the key")
    if fields.get(b"upgrade", b"").lower() != b"websocket":
        raise HandshakeError("the 101 answer does not upgrade to websocket")
    if fields.get(b"sec-websocket-extensions"):
        raise HandshakeError("the server chose an extension that was not offered")


async def _rejected_body(conn: h11.Connection, stream: Any) -> bytes:
    """The start of a refusal's body (for the error message)."""
    body = b""
    while len(body) < _MAX_REJECT_BODY:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(RECEIVE_SIZE)
            conn.receive_data(data)
            if not data:
                break
        elif isinstance(event, h11.Data):
            body += bytes(event.data)
        else:
            break
    return body[:_MAX_REJECT_BODY]


def split_ws_url(url: str) -> tuple[str, int, str, str, bool]:
    """``ws[s]://host[:port]/path?query`` -> (host, port, Host header,
    resource, secure)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a websocket URL: {url!r} (want ws://... or wss://...)")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    host_header = parts.netloc.rpartition("@")[2]
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, host_header, resource, secure
