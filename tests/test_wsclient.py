"""flows._wsclient (the websocket client) against an independent server:
wsproto does the server's handshake, encodes the frames it sends and decodes
(and so checks) the client's frames; malformed frames are written raw.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from flows._wsclient import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocket,
    encode_frame,
    open_ws,
    split_ws_url,
)

# -- the server ----------------------------------------------------------------------


class Peer:
    """The server's end of one connection: wsproto over a trio stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.SERVER)
        self.request: Request | None = None
        self._events: deque[Event] = deque()

    async def send(self, *items: Event | bytes) -> None:
        """wsproto events and raw bytes, in one write."""
        await self.stream.send_all(b"".join(
            item if isinstance(item, bytes) else self.ws.send(item) for item in items))

    async def next_event(self) -> Event | None:
        """The next event from the client; None at the end of the stream."""
        while not self._events:
            try:
                data = await self.stream.receive_some()
            except trio.BrokenResourceError:
                data = b""
            if not data:
                return None
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.popleft()

    async def next_message(self) -> str | bytes:
        """The next whole data message (wsproto may hand it over in parts)."""
        parts = []
        while True:
            event = await self.next_event()
            assert isinstance(event, Message), event
            parts.append(event.data)
            if event.message_finished:
                return type(parts[0])().join(parts)


Script = Callable[[Peer], Awaitable[Any]]


class Server:
    def __init__(self, url: str) -> None:
        self.url = url
        self.peer: Peer | None = None
        self.done = trio.Event()
        self.value: Any = None

    async def result(self) -> Any:
        """What the script returned (once it has)."""
        await self.done.wait()
        return self.value


@asynccontextmanager
async def serve(script: Script, *, accept: bool = True,
                ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A websocket server on 127.0.0.1 whose connection runs ``script`` after
    reading the upgrade request (and, with ``accept``, accepting it)."""

    async def handler(stream: trio.abc.Stream) -> None:
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_side=True)
        peer = server.peer = Peer(stream)
        try:
            request = await peer.next_event()
            assert isinstance(request, Request), request
            peer.request = request
            if accept:
                await peer.send(AcceptConnection())
            server.value = await script(peer)
        finally:
            server.done.set()
            await trio.aclose_forcefully(stream)

    with trio.fail_after(10):  # a hang guard
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            server = Server(f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}/feed")
            yield server
            nursery.cancel_scope.cancel()


async def close_after(peer: Peer, *items: Event | bytes) -> Event | None:
    """Send ``items``, then return the client's next event (its close)."""
    await peer.send(*items)
    return await peer.next_event()


def close_frame(code: int, reason: str = "") -> CloseConnection:
    return CloseConnection(code=code, reason=reason)


# -- receiving -----------------------------------------------------------------------


async def test_messages_arrive_in_order_one_or_all_at_a_time():
    async def script(peer: Peer):
        await peer.send(TextMessage("one"), BytesMessage(b"two"))
        assert await peer.next_message() == "more"
        await peer.send(TextMessage("3"), BytesMessage(b"\x00\xff"), TextMessage("é"))
        return await peer.next_event()

    async with serve(script) as server:
        async with open_ws(server.url + "?x=1", headers={"X-Token": "abc"}) as ws:
            assert await ws.get_message() == b"one"
            assert await ws.get_message() == b"two"
            await ws.send_message("more")
            assert await ws.receive_messages() == [b"3", b"\x00\xff", "é".encode()]
        assert await server.result() == close_frame(1000)
    request = server.peer.request
    assert request.target == "/feed?x=1"
    assert request.host == server.url.split("/")[2]
    assert (b"x-token", b"abc") in request.extra_headers


async def test_frames_in_the_same_write_as_the_101_are_delivered():
    async def script(peer: Peer):
        await peer.send(AcceptConnection(), TextMessage("early"), BytesMessage(b"bird"))
        return await peer.next_event()

    async with serve(script, accept=False) as server:
        async with open_ws(server.url) as ws:
            assert await ws.receive_messages() == [b"early", b"bird"]
        assert await server.result() == close_frame(1000)


async def test_fragments_are_joined_and_a_ping_between_them_answered():
    async def script(peer: Peer):
        await peer.send(TextMessage("hel", message_finished=False), Ping(b"p1"))
        pong = await peer.next_event()  # answered before the message is complete
        await peer.send(TextMessage("lo ", message_finished=False),
                        TextMessage("world"), BytesMessage(b"next"))
        return pong

    async with serve(script) as server, open_ws(server.url) as ws:
        assert await ws.receive_messages() == [b"hello world", b"next"]
        assert await server.result() == Pong(b"p1")


async def test_16_and_64_bit_lengths_arrive_intact():
    sizes = [0, 125, 126, 200, 65535, 65536, 70_000]
    payloads = [os.urandom(n) for n in sizes]

    async def script(peer: Peer):
        for payload in payloads:
            await peer.send(BytesMessage(payload))
        await peer.send(TextMessage("x" * 70_000))
        return await peer.next_event()

    async with serve(script) as server:
        async with open_ws(server.url) as ws:
            assert [await ws.get_message() for _ in sizes] == payloads
            assert await ws.get_message() == b"x" * 70_000
        assert await server.result() == close_frame(1000)


BAD_FRAMES = {
    "masked server frame": (
        encode_frame(0x1, b"hi", mask=b"abcd"), 1002, "masked frame from the server"),
    "reserved bit set": (
        bytes((0xC1, 2)) + b"hi", 1002, "reserved bits set (no extension was negotiated)"),
    "unknown opcode": (encode_frame(0x3, b"hi"), 1002, "unknown opcode 0x3"),
    "control frame too long": (
        encode_frame(0x9, b"x" * 126), 1002, "bad control frame (opcode 0x9)"),
    "fragmented control frame": (bytes((0x09, 0)), 1002, "bad control frame (opcode 0x9)"),
    "continuation without start": (
        encode_frame(0x0, b"hi"), 1002, "continuation frame without a message"),
    "new message inside a fragmented one": (
        bytes((0x01, 2)) + b"ab" + encode_frame(0x1, b"cd"), 1002,
        "new message inside a fragmented one"),
    "frame over max_message_size": (
        encode_frame(0x2, b"x" * 1001), 1009, "frame of 1001 bytes"),
    "fragments over max_message_size": (
        bytes((0x02, 126)) + (600).to_bytes(2, "big") + b"x" * 600
        + encode_frame(0x0, b"x" * 401), 1009, "message over 1000 bytes"),
}


@pytest.mark.parametrize(("frame", "code", "reason"), BAD_FRAMES.values(), ids=BAD_FRAMES)
async def test_bad_frame_closes_with_1002_or_1009(frame, code, reason):
    before = b"b" * 1000  # at max_message_size: still fine

    async with serve(lambda peer: close_after(peer, BytesMessage(before), frame)) as server:
        async with open_ws(server.url, max_message_size=1000) as ws:
            assert await ws.get_message() == before
            with pytest.raises(ConnectionClosed) as closed:
                await ws.get_message()
        assert await server.result() == close_frame(code, reason)
    assert (closed.value.code, closed.value.reason, closed.value.local) == (code, reason, True)
    assert ws.closed is closed.value


@pytest.mark.parametrize(("frame", "code", "reason", "echo"), [
    (close_frame(4000, "bye"), 4000, "bye", 4000),
    (b"\x88\x00", 1005, "", 1000),  # no code: answered with 1000
], ids=["4000 bye", "no code"])
async def test_server_close_comes_after_earlier_messages_and_is_echoed(frame, code, reason, echo):
    async with serve(lambda peer: close_after(peer, TextMessage("a"), BytesMessage(b"b"), frame)) as server:
        async with open_ws(server.url) as ws:
            assert await ws.receive_messages() == [b"a", b"b"]
            with pytest.raises(ConnectionClosed) as closed:
                await ws.receive_messages()
            with pytest.raises(ConnectionClosed):
                await ws.send_message("late")
        assert await server.result() == close_frame(echo)
    assert (closed.value.code, closed.value.reason, closed.value.local) == (code, reason, False)


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
async def test_dropped_connection_raises_1006(reset):
    async def script(peer: Peer):
        await peer.send(TextMessage("last"))
        assert await peer.next_message() == "got it"
        if reset:  # close with an RST instead of a FIN
            peer.stream.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    async with serve(script) as server, open_ws(server.url) as ws:
        assert await ws.get_message() == b"last"
        await ws.send_message("got it")
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        with pytest.raises(ConnectionClosed):
            await ws.send_message("late")
    assert (closed.value.code, closed.value.local) == (1006, False)


# -- sending and closing -------------------------------------------------------------


async def test_sent_messages_are_masked_typed_and_never_interleaved():
    def payload(task: int, n: int) -> bytes:
        return f"{task}:{n}:".encode().ljust(5000, b"ab"[task : task + 1])

    async def script(peer: Peer):
        got = [await peer.next_message() for _ in range(102)]
        ping = await peer.next_event()
        await peer.send(ping.response(), TextMessage("after the pong"))
        return got, await peer.next_event()

    async def sender(ws: WebSocket, task: int) -> None:
        for n in range(50):
            await ws.send_message(payload(task, n))

    async with serve(script) as server:
        async with open_ws(server.url) as ws:
            await ws.send_message("text é")
            await ws.send_message(b"\x00binary")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sender, ws, 0)
                nursery.start_soon(sender, ws, 1)
            await ws.ping(b"hb")
            assert await ws.get_message() == b"after the pong"  # the pong skipped
        got, close = await server.result()
    assert got[:2] == ["text é", b"\x00binary"]
    for task in (0, 1):
        assert [m for m in got[2:] if m.startswith(b"%d:" % task)] == [
            payload(task, n) for n in range(50)]
    assert len(got) == 102
    assert close == close_frame(1000)


@pytest.fixture
def patient_clock():
    """Virtual time that jumps only after 0.2 s of real idleness: a loaded
    machine can take a while to move 32 MiB over loopback, and a jump then
    would expire ``close_timeout`` while the bytes are still on their way."""
    return trio.testing.MockClock(autojump_threshold=0.2)


async def test_a_send_cut_short_by_a_timeout_still_puts_the_whole_frame_out(patient_clock):
    """Cancelling a send mid-frame would corrupt the stream: the frame goes
    out whole (within close_timeout) and the connection stays usable."""
    big = os.urandom(32 << 20)  # more than the socket buffers hold

    async def script(peer: Peer):
        await trio.sleep(1.5)  # start reading after the client's timeout
        return len(await peer.next_message()), await peer.next_message()

    async with serve(script) as server, open_ws(server.url, close_timeout=5.0) as ws:
        with trio.move_on_after(1.0) as scope:
            await ws.send_message(big)
        assert scope.cancel_called and ws.closed is None  # late, but whole
        await ws.send_message("after")
        assert await server.result() == (len(big), "after")


@pytest.mark.parametrize(("args", "code", "reason"), [
    ((), 1000, ""), ((4001, "done"), 4001, "done")])
async def test_close_handshake(args, code, reason, autojump_clock):
    async def script(peer: Peer):
        close = await peer.next_event()
        await peer.send(close.response())
        assert await peer.next_event() is None  # then the client hangs up
        return close

    async with serve(script) as server:
        async with open_ws(server.url, close_timeout=3) as ws:
            start = trio.current_time()
            if args:
                await ws.aclose(*args)
        assert trio.current_time() - start < 3  # it did not wait for close_timeout
        assert await server.result() == close_frame(code, reason)
    assert (ws.closed.code, ws.closed.reason, ws.closed.local) == (code, reason, True)


async def test_aclose_gives_up_after_close_timeout(autojump_clock):
    async def script(peer: Peer):
        close = await peer.next_event()
        assert await peer.next_event() is None  # never answers; the client hangs up
        return close

    async with serve(script) as server:
        async with open_ws(server.url, close_timeout=3):
            start = trio.current_time()
        assert trio.current_time() - start == pytest.approx(3)
        assert await server.result() == close_frame(1000)


# -- the upgrade ---------------------------------------------------------------------


async def test_rejected_upgrade_raises_with_status_and_body():
    async def script(peer: Peer):
        await peer.send(RejectConnection(status_code=403, has_body=True,
                                         headers=[(b"content-type", b"text/plain")]),
                        RejectData(b"no entry"))

    async with serve(script, accept=False) as server:
        with pytest.raises(ConnectionRejected) as rejected:
            async with open_ws(server.url):
                pytest.fail("connected")
    assert (rejected.value.status_code, rejected.value.body) == (403, b"no entry")
    assert (b"content-type", b"text/plain") in rejected.value.headers


BAD_ANSWERS = {
    "wrong accept": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    "an extension not offered": AcceptConnection(
        extra_headers=[(b"Sec-WebSocket-Extensions", b"permessage-deflate")]),
    "not HTTP": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "closed": b"",
}


@pytest.mark.parametrize("answer", BAD_ANSWERS.values(), ids=BAD_ANSWERS)
async def test_bad_upgrade_answer_raises_handshake_error(answer):
    async with serve(lambda peer: peer.send(answer), accept=False) as server:
        with pytest.raises(HandshakeError) as failed:
            async with open_ws(server.url):
                pytest.fail("connected")
    assert type(failed.value) is HandshakeError


async def test_unanswered_upgrade_times_out(autojump_clock):
    async def never_answer(peer: Peer):
        await trio.sleep_forever()

    async with serve(never_answer, accept=False) as server:
        start = trio.current_time()
        with pytest.raises(TimeoutError):
            async with open_ws(server.url, connect_timeout=4):
                pytest.fail("connected")
        assert trio.current_time() - start == pytest.approx(4)
        assert server.peer.request is not None  # the timeout hit after the request


async def test_refused_connection_raises_oserror():
    with socket.socket() as unused:  # bound, not listening: connections are refused
        unused.bind(("127.0.0.1", 0))
        with pytest.raises(OSError) as failed:
            async with open_ws(f"ws://127.0.0.1:{unused.getsockname()[1]}/"):
                pytest.fail("connected")
    assert not isinstance(failed.value, HandshakeError | TimeoutError)


async def test_wss_with_a_trusted_certificate():
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def script(peer: Peer):
        await peer.send(TextMessage("secret"))
        return await peer.next_message(), await peer.next_event()

    async with serve(script, ssl_context=server_context) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        async with open_ws(server.url, ssl_context=client_context) as ws:
            assert await ws.get_message() == b"secret"
            await ws.send_message("reply")
        assert await server.result() == ("reply", close_frame(1000))


async def test_wss_with_an_untrusted_certificate_fails_clearly():
    trustme = pytest.importorskip("trustme")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(server_context)

    async def script(peer: Peer):
        return None

    async with serve(script, ssl_context=server_context) as server:
        with pytest.raises(HandshakeError, match="certificate"):
            async with open_ws(server.url):  # the system's trust store
                pass


@pytest.mark.parametrize(("url", "parts"), [
    ("ws://example.com", ("example.com", 80, "example.com", "/", False)),
    ("wss://example.com/feed", ("example.com", 443, "example.com", "/feed", True)),
    ("ws://example.com:8080/a/b?x=1&y=2",
     ("example.com", 8080, "example.com:8080", "/a/b?x=1&y=2", False)),
    ("wss://example.com?s=btc", ("example.com", 443, "example.com", "/?s=btc", True)),
    ("wss://user:pw@example.com:9443/s", ("example.com", 9443, "example.com:9443", "/s", True)),
    ("ws://[::1]:9000/x", ("::1", 9000, "[::1]:9000", "/x", False)),
])
def test_split_ws_url(url, parts):
    assert split_ws_url(url) == parts


@pytest.mark.parametrize("url", ["http://example.com/", "example.com", "ws://", "wss:///x"])
def test_split_ws_url_rejects_non_websocket_urls(url):
    with pytest.raises(ValueError, match="not a websocket URL"):
        split_ws_url(url)


# -- property: any messages, cut anywhere ------------------------------------------------

SIZES = st.integers(0, 300) | st.sampled_from([125, 126, 65535, 65536]) | st.integers(0, 70_000)


@st.composite
def wire_cases(draw):
    """(messages, pings, the server's bytes, cut points)."""
    encoder = Connection(ConnectionType.SERVER)
    messages, pings, frames = [], [], []
    for n in range(draw(st.integers(0, 6))):
        text, size = draw(st.booleans()), draw(SIZES)
        payload = ("aé€😀" * size)[:size] if text else os.urandom(size)
        cuts = sorted(draw(st.lists(st.integers(0, size), max_size=3)))
        parts = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            event = TextMessage if text else BytesMessage
            frames.append(encoder.send(event(part, message_finished=last)))
            if not last and draw(st.booleans()):
                pings.append(b"%d.%d" % (n, i))
                frames.append(encoder.send(Ping(pings[-1])))
        messages.append(payload.encode() if text else payload)
    frames.append(encoder.send(CloseConnection(1000)))
    wire = b"".join(frames)
    starts = [sum(map(len, frames[:i])) for i in range(len(frames))]
    near_heads = [min(s + k, len(wire)) for s in starts for k in range(11)]
    cuts = draw(st.lists(st.sampled_from(near_heads) | st.integers(0, len(wire)), max_size=30))
    return messages, pings, wire, sorted(cuts)


@settings(max_examples=50, deadline=None)
@given(wire_cases())
def test_any_messages_cut_anywhere_come_out_whole(case):
    messages, pings, wire, cuts = case
    chunks = deque(wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True) if a < b)

    async def one_chunk_per_read():
        if chunks:
            incoming.put_data(chunks.popleft())

    incoming = trio.testing.MemoryReceiveStream(one_chunk_per_read)
    outgoing = trio.testing.MemorySendStream()

    async def main():
        ws = WebSocket(trio.StapledStream(outgoing, incoming), b"")
        got = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                batch = await ws.receive_messages()
                assert batch
                got += batch
        assert closed.value.code == 1000
        return got

    assert trio.run(main) == messages
    answers = Connection(ConnectionType.SERVER)  # wsproto checks the client's frames
    answers.receive_data(outgoing.get_data_nowait())
    assert list(answers.events()) == [*map(Pong, pings), close_frame(1000)]
