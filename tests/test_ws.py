"""flows._ws.WebSocketSource against a tiny fake exchange served by trio-websocket.

The fake protocol: connect to ``/feed``; send ``{"op":"sub","symbols":[...]}``
(answered ``{"op":"ack"}``); every ``every`` seconds the server sends
``{"s":symbol,"p":price,"n":seq,"ts":epoch}`` per subscribed symbol, and on
demand an exchange-level ``{"op":"ping","n":k}`` that wants
``{"op":"pong","n":k}`` back.
"""

from __future__ import annotations

import itertools
import time

import msgspec
import pytest
import trio
from _streams import FLOW, running, until
from trio_websocket import ConnectionClosed, serve_websocket

from flows import RECONNECT_REASONS, RateLimit, Retry, StreamParsed, WebSocketSource
from flows.testing import assert_component_metrics, sample


class _Msg(msgspec.Struct):
    op: str | None = None
    n: int | None = None
    s: str | None = None
    p: float | None = None
    ts: float | None = None


_decode = msgspec.json.Decoder(_Msg).decode


class FakeSource(WebSocketSource):
    """The client side of the fake protocol: one subscribe message per
    ``per_message`` symbols, ``hb`` heartbeats, pongs for pings."""

    def __init__(self, *, per_message: int = 2, name: str = "fake", **options) -> None:
        super().__init__(name=name, **options)
        self.per_message = per_message
        self.gaps: list[str] = []

    def url(self, symbols):
        return self.base_url + "/feed"

    def subscribe_messages(self, symbols):
        per = self.per_message
        return [msgspec.json.encode({"op": "sub", "symbols": symbols[i : i + per]}).decode()
                for i in range(0, len(symbols), per)]

    def heartbeat(self):
        return "hb"

    def parse(self, message):
        m = _decode(message)
        out = StreamParsed()
        if m.op == "ping":
            out.replies.append(msgspec.json.encode({"op": "pong", "n": m.n}).decode())
        elif m.op is None:
            if m.p is None or m.s is None or not m.p > 0:
                raise ValueError(f"bad price {m.p!r}")
            from flows import Tick

            out.ticks.append(Tick(self.name, m.s, m.p, m.ts or time.time()))
            if m.n is not None:
                out.sequences.append((m.s, m.n))
        return out

    def on_gap(self, key):
        self.gaps.append(key)
        super().on_gap(key)


class Fake:
    """The fake exchange. ``modes`` lists, per coming connection, how it
    behaves: ``normal``, ``silent`` (never sends data), ``close`` (closes with
    a close frame after the first round), ``reject`` (refuses the handshake)."""

    def __init__(self, *, every: float = 0.05, burst: int = 1) -> None:
        self.every, self.burst = every, burst
        self.modes: list[str] = []
        self.connections: list[dict] = []
        self.seq: dict[str, int] = {}
        self.skip: dict[str, int] = {}
        self.extra: list[str] = []
        self.url = ""

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(serve_websocket, self.handler, "127.0.0.1", 0, None)
            self.url = f"ws://127.0.0.1:{server.port}"
            task_status.started(self.url)

    def subs(self) -> list[list[str]]:
        return [c["subs"] for c in self.connections]

    async def handler(self, request):
        mode = self.modes.pop(0) if self.modes else "normal"
        if mode == "reject":
            await request.reject(503)
            return
        ws = await request.accept()
        conn = {"subs": [], "received": [], "mode": mode, "ws": ws}
        self.connections.append(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ws, conn)
                while True:  # not a wait: the fake server feeds its client until it goes
                    await trio.sleep(self.every)
                    if conn["mode"] == "silent":
                        continue
                    if conn["mode"] == "close":
                        await ws.aclose(1001, "going away")
                        return
                    extra, self.extra = self.extra, []
                    for text in extra:
                        await ws.send_message(text)
                    for _ in range(self.burst):
                        for s in list(conn["subs"]):
                            n = self.seq[s] = self.seq.get(s, 0) + 1 + self.skip.pop(s, 0)
                            await ws.send_message(msgspec.json.encode(
                                {"s": s, "p": 100.0 + n, "n": n, "ts": time.time()}).decode())
        except* ConnectionClosed:
            pass

    async def _read(self, ws, conn):
        try:
            while True:
                text = await ws.get_message()
                conn["received"].append((trio.current_time(), text))
                if text.startswith("{"):
                    msg = msgspec.json.decode(text)
                    if msg.get("op") == "sub":
                        conn["subs"].extend(msg["symbols"])
                        await ws.send_message('{"op":"ack"}')
        except ConnectionClosed:
            pass


@pytest.fixture
async def fake(nursery):
    f = Fake()
    await nursery.start(f.serve)
    return f


def reconnects(registry, stage: str = "fake") -> dict[str, float]:
    return {r: sample(registry, "flows_source_reconnects_total", FLOW, stage, reason=r)
            for r in RECONNECT_REASONS}


SYMBOLS = [f"S{i}" for i in range(10)]


async def test_shards_subscribe_paced_and_stream_ticks(fake, autojump_clock):
    source = FakeSource(symbols=SYMBOLS, base_url=fake.url, max_streams_per_connection=4,
                        per_message=1, subscribe_limits=[RateLimit(2, 1.0)])
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(SYMBOLS))
        assert_component_metrics(registry, FLOW, "fake", "source")
    subs = sorted(fake.subs(), key=len)
    assert [len(s) for s in subs] == [2, 4, 4]
    assert sorted(itertools.chain(*subs)) == sorted(SYMBOLS)
    for conn in fake.connections:  # 2 messages per second per connection: 0.5 s apart
        times = [t for t, text in conn["received"] if '"sub"' in text]
        assert all(b - a >= 0.5 * 0.999 for a, b in itertools.pairwise(times))
    assert all(t.price > 100 and t.source == "fake" for t in sink.records)
    assert sample(registry, "flows_source_messages_total", FLOW, "fake") >= len(SYMBOLS)
    assert reconnects(registry) == dict.fromkeys(RECONNECT_REASONS, 0.0)


async def test_messages_that_arrive_together_share_a_batch(fake, autojump_clock):
    fake.burst = 20  # 20 rounds of 5 symbols at once
    source = FakeSource(symbols=SYMBOLS[:5], base_url=fake.url, per_message=5)
    async with running(source) as (_, sink, _):
        await until(lambda: len(sink.records) >= 300)
    assert sink.batches <= len(sink.records) / 20
    # without a window, every message is its own batch
    source = FakeSource(symbols=SYMBOLS[:5], base_url=fake.url, per_message=5, batch_window=0)
    async with running(source) as (_, sink, _):
        await until(lambda: len(sink.records) >= 100)
    assert sink.batches == len(sink.records)
    # and batch_size caps a batch
    source = FakeSource(symbols=SYMBOLS[:5], base_url=fake.url, per_message=5, batch_size=7)
    async with running(source) as (_, sink, _):
        await until(lambda: len(sink.records) >= 100)
    assert sink.batches >= len(sink.records) / 7


async def test_pings_get_answers_and_heartbeats_go_out(fake, autojump_clock):
    source = FakeSource(symbols=SYMBOLS[:2], base_url=fake.url, heartbeat_interval=0.5)
    async with running(source) as (_, sink, _):
        await until(lambda: len(sink.records) > 0)
        fake.extra = ['{"op":"ping","n":7}']
        ws = fake.connections[0]["ws"]
        with trio.fail_after(5):
            await ws.ping(b"protocol")  # trio-websocket answers protocol pings by itself
        await until(lambda: any(text == '{"op":"pong","n":7}'
                                for _, text in fake.connections[0]["received"]))
        await trio.sleep(2.2)
    beats = [t for t, text in fake.connections[0]["received"] if text == "hb"]
    assert len(beats) >= 3
    assert all(b - a >= 0.5 * 0.999 for a, b in itertools.pairwise(beats))


async def test_a_silent_connection_is_replaced_and_resubscribed(fake, autojump_clock):
    fake.modes = ["silent"]
    source = FakeSource(symbols=SYMBOLS[:3], base_url=fake.url, silence_timeout=2.0)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) > 0)
        assert trio.current_time() >= 2.0  # nothing came before the silence timeout
    assert reconnects(registry)["silent"] == 1
    assert len(fake.connections) == 2
    assert fake.subs()[0] == fake.subs()[1] == SYMBOLS[:3]


async def test_reconnect_reasons_are_counted(fake, autojump_clock):
    fake.modes = ["close", "reject"]
    source = FakeSource(symbols=SYMBOLS[:2], base_url=fake.url, retry=Retry(backoff=0.1))
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) > 0)
    counted = reconnects(registry)
    assert counted["server"] == 1 and counted["error"] == 1
    assert counted["closed"] == counted["silent"] == counted["timeout"] == 0
    assert sample(registry, "flows_errors_total", FLOW, "fake",
                  error_type="ConnectionRejected") == 1


async def hold(stream) -> None:
    await trio.sleep_forever()


async def test_connect_timeout_and_refused_connections_back_off(autojump_clock):
    # a listener that accepts TCP connections but never answers the handshake
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, hold, 0)
        port = listeners[0].socket.getsockname()[1]
        source = FakeSource(symbols=SYMBOLS[:2], base_url=f"ws://127.0.0.1:{port}",
                            connect_timeout=1.0, retry=Retry(backoff=0.5, max_backoff=4.0), down_after=3.0)
        async with running(source) as (rt, _, registry):
            await until(lambda: reconnects(registry)["timeout"] >= 2, poll=0.5)
            assert source.health() is None or "disconnected" in source.health()
            await trio.sleep(3)
            assert "disconnected" in source.health()
            assert not rt.ready()[0]
            assert sample(registry, "flows_source_connection_uptime_seconds", FLOW, "fake") == 0
        nursery.cancel_scope.cancel()
    # nothing listens on the port now: refused, counted as errors, with backoff
    source = FakeSource(symbols=SYMBOLS[:2], base_url=f"ws://127.0.0.1:{port}",
                        retry=Retry(backoff=0.5, max_backoff=4.0))
    async with running(source) as (_, _, registry):
        start = trio.current_time()
        await trio.sleep(60)
    attempts = reconnects(registry)["error"]
    assert 5 <= attempts <= 45, attempts  # not a tight loop: about 2 s apart on average
    assert trio.current_time() - start >= 60


async def test_health_and_uptime_follow_the_connection(fake, autojump_clock):
    source = FakeSource(symbols=SYMBOLS[:2], base_url=fake.url, down_after=1.0)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) > 0)
        await trio.sleep(5)
        assert source.health() is None
        # uptime is real (monotonic) seconds; with the mock clock it barely moves
        assert sample(registry, "flows_source_connection_uptime_seconds", FLOW, "fake") > 0
    assert source.uptime() == 0


async def test_bad_messages_and_unknown_symbols_are_counted_and_skipped(fake, autojump_clock):
    source = FakeSource(symbols=SYMBOLS[:2], base_url=fake.url)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) > 0)
        fake.extra = ["not json", '{"s":"S0","p":-1}', '{"s":"NOPE","p":5.0}', '{"s":"S1"']
        await until(lambda: sample(registry, "flows_records_discarded_total", FLOW, "fake",
                                   reason="invalid") == 3, poll=0.2)
        before = len(sink.records)
        await until(lambda: len(sink.records) > before + 4)
    assert sample(registry, "flows_records_discarded_total", FLOW, "fake",
                  reason="unknown_symbol") == 1
    assert {t.symbol for t in sink.records} == {"S0", "S1"}
    assert reconnects(registry) == dict.fromkeys(RECONNECT_REASONS, 0.0)


async def test_gaps_are_counted_and_reported(fake, autojump_clock):
    source = FakeSource(symbols=SYMBOLS[:2], base_url=fake.url)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) > 4)
        fake.skip["S1"] = 3
        await until(lambda: source.gaps == ["S1"])
        # a repeated or older id is not a gap
        fake.extra = [msgspec.json.encode({"s": "S0", "p": 1.0, "n": 1}).decode()]
        n = len(sink.records)
        await until(lambda: len(sink.records) > n + 6)
    assert source.gaps == ["S1"]
    assert sample(registry, "flows_source_gaps_total", FLOW, "fake") == 1


async def test_argument_checks():
    with pytest.raises(ValueError, match="symbols"):
        FakeSource(symbols=[], base_url="ws://x")
    with pytest.raises(ValueError):
        FakeSource(symbols=["A"], base_url="ws://x", silence_timeout=0)
    source = FakeSource(symbols=[f"S{i}" for i in range(2500)], base_url="ws://x")
    assert [len(s) for s in source.shard(source.symbols)] == [1024, 1024, 452]
