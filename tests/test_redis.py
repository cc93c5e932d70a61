"""sinks.redis and sources.redis against a real redis-server: entries, acks, reclaim."""

from __future__ import annotations

import threading
import time
import uuid

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from flows import Flow, Retry, Runtime, Tick
from flows.testing import (
    ListSink,
    ListSource,
    assert_component_metrics,
    run_briefly,
    sample,
    wait_until,
)
from flows.testing.redis import RedisServer, free_port, redis_server_path

redis = pytest.importorskip("redis", reason="redis-py is not installed (pip install 'flows[redis]')")

pytestmark = pytest.mark.skipif(
    redis_server_path() is None,
    reason="redis-server is not installed (Debian: apt-get install redis-server)",
)

from sinks.redis import FIELD, RedisStreamSink
from sources.redis import RedisStreamSource


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def client(server):
    conn = redis.Redis.from_url(server.url, protocol=2)
    yield conn
    conn.close()


@pytest.fixture
def stream():
    return f"s-{uuid.uuid4().hex[:8]}"


@pytest.fixture(autouse=True)
def no_thread_left():
    yield
    deadline = time.monotonic() + 5.0
    for t in threading.enumerate():
        if t.name.startswith("flows-redis"):
            t.join(max(deadline - time.monotonic(), 0.0))
            assert not t.is_alive(), f"thread {t.name} still runs after the test"


def ticks(n: int, offset: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i % 7}", 10.0 + i, 1_700_000_000.0 + i, bid=9.5, volume=3.0)
            for i in range(offset, offset + n)]


def put(client, stream: str, records) -> None:
    with client.pipeline(transaction=False) as pipe:
        for r in records:
            pipe.xadd(stream, {FIELD: msgspec.json.encode(r)})
        pipe.execute()


class FailingSink(ListSink):
    """Takes every batch and acks it ``failed`` (a sink that gave up)."""

    async def run(self, inbox):
        async for batch in inbox:
            self.records.extend(batch.records)
            batch.ack("failed")


async def run_until(flow: Flow, registry, done, *, timeout: float = 5.0) -> float:
    """Run ``flow`` until ``done()``, then stop it; returns how long the stop took."""
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(timeout):
            while not done():
                await trio.sleep(0.01)
        t0 = time.monotonic()
        rt.stop()
    return time.monotonic() - t0


def pending(client, stream: str, group: str = "flows") -> int:
    return client.xpending(stream, group)["pending"]


# -- the server helper ------------------------------------------------------


def test_a_server_whose_port_was_taken_meanwhile_starts_on_another():
    """free_port() then the server's bind: another process may bind the port
    in between (a machine shared by several test runs)."""
    import socket

    from flows.testing._ports import PortInUse

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = RedisServer()
        server.port = busy  # as if taken after free_port() picked it
        with server:
            assert server.port != busy and server.url.endswith(f":{server.port}/0")
            with redis.Redis.from_url(server.url) as conn:
                assert conn.ping()
        with pytest.raises(PortInUse, match=r"[Aa]ddress already in use"):
            RedisServer(port=busy).start()  # a port the caller chose is kept


# -- sink ----------------------------------------------------------------


async def test_sink_appends_one_entry_per_record(client, stream, server):
    data = ticks(2500)
    sink = RedisStreamSink(server.url, stream=stream, batch_size=1000, flush_interval=60.0)
    flow = Flow("rs", sources=[ListSource([data[i:i + 100] for i in range(0, 2500, 100)])], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    entries = client.xrange(stream)
    assert [list(fields) for _, fields in entries] == [[FIELD]] * 2500
    assert [msgspec.json.decode(f[FIELD], type=Tick) for _, f in entries] == data
    # the documented format: a plain JSON object per entry
    assert msgspec.json.decode(entries[0][1][FIELD]) == {
        "source": "t", "symbol": "S0", "price": 10.0, "ts": 1_700_000_000.0,
        "bid": 9.5, "ask": None, "volume": 3.0,
    }
    assert sample(registry, "flows_sink_batch_records_count", "rs", "redis") == 3
    assert sample(registry, "flows_sink_batch_records_sum", "rs", "redis") == 2500
    assert_component_metrics(registry, "rs", "redis", "sink")


async def test_sink_caps_the_stream_with_maxlen(client, stream, server):
    data = ticks(5000)
    sink = RedisStreamSink(server.url, stream=stream, maxlen=1000, batch_size=500)
    flow = Flow("cap", sources=[ListSource([data[i:i + 500] for i in range(0, 5000, 500)])], sinks=[sink])
    await run_briefly(flow)
    length = client.xlen(stream)
    assert 1000 <= length < 1500  # MAXLEN ~: trimmed by whole nodes, never below the cap
    last = client.xrevrange(stream, count=1)[0][1][FIELD]
    assert msgspec.json.decode(last, type=Tick) == data[-1]


async def test_sink_blocks_and_retries_while_redis_is_down(client, stream):
    port = free_port()
    sink = RedisStreamSink(f"redis://127.0.0.1:{port}/0", stream=stream,
                           retry=Retry(backoff=0.01, max_backoff=0.05))
    flow = Flow("down", sources=[ListSource([ticks(30)])], sinks=[sink])
    registry = CollectorRegistry()
    outcome = []
    late = RedisServer(port=port)
    try:
        async with trio.open_nursery() as nursery:
            async def go():
                outcome.append(await Runtime(flow, registry=registry, metrics_addr=None).run())

            nursery.start_soon(go)
            # refused connections meanwhile: retried, not dropped
            await wait_until(lambda: sample(registry, "flows_sink_retries_total", "down", "redis") >= 2,
                             timeout=30)
            assert not outcome
            late.start()
        result, = outcome
        assert result.clean
        with redis.Redis.from_url(late.url) as conn:
            assert conn.xlen(stream) == 30
    finally:
        late.stop()
    assert sample(registry, "flows_sink_retries_total", "down", "redis") >= 1
    assert sample(registry, "flows_errors_total", "down", "redis", error_type="ConnectionError") >= 1
    assert sample(registry, "flows_records_discarded_total", "down", "redis", reason="write_failed") == 0


async def test_sink_rejects_a_record_too_large_or_unencodable_alone(client, stream, server):
    """Fault 3: a record whose entry is over max_entry_bytes (Redis would drop
    the connection, for ever) or that cannot be encoded is dropped alone."""
    good = ticks(20)
    big = Tick("t", "X" * 5000, 1.0, 0.5)
    odd = Tick("t", "S", object(), 0.6)  # type: ignore[arg-type] - not JSON
    sink = RedisStreamSink(server.url, stream=stream, batch_size=100, max_entry_bytes=1000)
    flow = Flow("big", sources=[ListSource([good[:10], [big, odd], good[10:]])], sinks=[sink])
    with trio.fail_after(10):
        result, registry = await run_briefly(flow)
    assert result.clean
    assert [msgspec.json.decode(f[FIELD], type=Tick) for _, f in client.xrange(stream)] == good
    assert sample(registry, "flows_records_discarded_total", "big", "redis", reason="rejected") == 2
    assert sample(registry, "flows_errors_total", "big", "redis", error_type="EntryTooLarge") >= 1
    assert sample(registry, "flows_sink_retries_total", "big", "redis") == 0


@pytest.mark.parametrize("password", ["wrong-password", None])
async def test_sink_with_bad_credentials_fails_not_retried(stream, password):
    """Fault 3: a wrong password (WRONGPASS) or none (NOAUTH) is not retried
    for ever: the flow stops with Redis' message."""
    from flows import FlowFailed, Supervision

    with RedisServer(password="right-password") as guarded:
        url = guarded.url.replace("right-password", password) if password else (
            f"redis://127.0.0.1:{guarded.port}/0")
        flow = Flow("auth", sources=[ListSource([ticks(5)])],
                    sinks=[RedisStreamSink(url, stream=stream, retry=Retry(backoff=0.01))],
                    supervision=Supervision(max_restarts=1, backoff=0.0))
        registry = CollectorRegistry()
        with trio.fail_after(10), pytest.raises(FlowFailed, match="AuthenticationError") as failed:
            await Runtime(flow, registry=registry, metrics_addr=None).run()
        with redis.Redis.from_url(guarded.url) as conn:
            assert conn.exists(stream) == 0
    message = str(failed.value)
    assert ("invalid username-password pair" in message if password else "authenticated" in message)
    assert "right-password" not in message and "wrong-password" not in message
    assert sample(registry, "flows_sink_retries_total", "auth", "redis") == 0
    assert sample(registry, "flows_records_discarded_total", "auth", "redis", reason="write_failed") == 5


# -- source ----------------------------------------------------------------


async def test_source_delivers_every_entry_and_acks_after_the_sinks(client, stream, server, registry):
    data = ticks(2500)
    put(client, stream, data)
    # block is long on purpose: the stop must still be prompt (CLIENT UNBLOCK)
    source = RedisStreamSource(server.url, stream=stream, consumer="c1", batch_size=1000, block=5.0)
    sink = ListSink()
    stop_took = await run_until(Flow("src", sources=[source], sinks=[sink]), registry,
                                lambda: len(sink.records) >= 2500)
    assert stop_took < 1.0
    assert await source.wait_acked()
    assert sink.records == data
    assert sink.batches == 3
    assert pending(client, stream) == 0
    assert source._acker.acked == 2500
    info = client.xinfo_groups(stream)[0]
    assert info["last-delivered-id"] == client.xrevrange(stream, count=1)[0][0]
    assert_component_metrics(registry, "src", "redis", "source")


class AckAtEnd(ListSink):
    """Holds every batch and acks them all with ``outcome`` once its inbox
    ends: after the source's run() was cancelled (the drain)."""

    def __init__(self, client, stream, outcome="written"):
        super().__init__()
        self.client, self.stream, self.outcome = client, stream, outcome
        self.pending_before = None

    async def run(self, inbox):
        held = []
        async for batch in inbox:
            self.records.extend(batch.records)
            held.append(batch)
        self.pending_before = pending(self.client, self.stream)
        for batch in held:
            batch.ack(self.outcome)


@pytest.mark.parametrize(
    "outcome, left", [("written", 0), ("skipped", 0), ("dropped", 0), ("failed", 120)]
)
async def test_acks_that_arrive_after_the_source_stopped_are_sent(
    client, stream, server, registry, outcome, left
):
    put(client, stream, ticks(120))
    source = RedisStreamSource(server.url, stream=stream, batch_size=50, block=0.1)
    sink = AckAtEnd(client, stream, outcome)
    await run_until(Flow("late", sources=[source], sinks=[sink]), registry,
                    lambda: len(sink.records) >= 120)
    assert await source.wait_acked()
    assert sink.pending_before == 120  # nothing was acked while the source ran
    assert pending(client, stream) == left
    assert source._acker.acked == 120 - left


async def test_a_stop_before_a_blocking_read_starts_does_not_wait(server):
    source = RedisStreamSource(server.url, block=5.0)
    ran, woken = [], []
    source._unblock = woken.append  # the wait for a read's thread to end
    with trio.CancelScope() as scope:
        scope.cancel()
        await source._wakeable(ran.append, "read")  # cancelled before its thread starts
    assert ran == [] and woken == []


async def test_failed_batches_stay_pending_and_another_consumer_reclaims_them(
    client, stream, server, registry
):
    data = ticks(300)
    put(client, stream, data)
    first = RedisStreamSource(server.url, stream=stream, consumer="a", claim_idle=60.0, block=0.1)
    failing = FailingSink()
    await run_until(Flow("f1", sources=[first], sinks=[failing]), registry,
                    lambda: len(failing.records) >= 300)
    assert await first.wait_acked()
    assert failing.records == data
    assert pending(client, stream) == 300  # "failed": not acked
    assert client.xpending(stream, "flows")["consumers"] == [{"name": b"a", "pending": 300}]

    second = RedisStreamSource(server.url, stream=stream, consumer="b", claim_idle=0.3, block=0.1)
    sink = ListSink()
    await run_until(Flow("f2", sources=[second], sinks=[sink]), registry,
                    lambda: len(sink.records) >= 300)
    assert await second.wait_acked()
    assert sink.records == data
    assert second.redelivered == 300
    assert pending(client, stream) == 0


async def test_reclaim_waits_for_the_idle_time(client, stream, server, registry):
    put(client, stream, ticks(10))
    read_at = time.monotonic()  # before the read: Redis times the idle from its delivery, later
    with client.pipeline() as pipe:  # a consumer that read them and died
        pipe.xgroup_create(stream, "flows", id="0")
        pipe.xreadgroup("flows", "dead", {stream: ">"})
        pipe.execute()
    source = RedisStreamSource(server.url, stream=stream, consumer="alive", claim_idle=0.4, block=0.05)
    sink = ListSink()
    got_at = []

    def done():
        if len(sink.records) >= 10 and not got_at:
            got_at.append(time.monotonic())
        return bool(got_at)

    await run_until(Flow("idle", sources=[source], sinks=[sink]), registry, done)
    assert await source.wait_acked()
    assert got_at[0] - read_at >= 0.4
    assert sink.records == ticks(10)
    assert pending(client, stream) == 0


async def test_a_restarted_consumer_redelivers_its_own_pending_entries(client, stream, server, registry):
    data = ticks(50)
    put(client, stream, data)
    before = RedisStreamSource(server.url, stream=stream, consumer="worker-1", block=0.1)
    failing = FailingSink()
    await run_until(Flow("r1", sources=[before], sinks=[failing]), registry,
                    lambda: len(failing.records) >= 50)
    assert await before.wait_acked()
    assert pending(client, stream) == 50
    put(client, stream, ticks(5, offset=50))  # new entries too

    # same name, claim far off: only its own PEL brings the old entries back
    after = RedisStreamSource(server.url, stream=stream, consumer="worker-1", claim_idle=60.0, block=0.1)
    sink = ListSink()
    await run_until(Flow("r2", sources=[after], sinks=[sink]), registry,
                    lambda: len(sink.records) >= 55)
    assert await after.wait_acked()
    assert sink.records == data + ticks(5, offset=50)
    assert after.redelivered == 50
    assert pending(client, stream) == 0


async def test_malformed_entries_are_counted_invalid_and_acked(client, stream, server, registry):
    good = ticks(3)
    client.xadd(stream, {FIELD: msgspec.json.encode(good[0])})
    client.xadd(stream, {FIELD: b"{not json"})
    client.xadd(stream, {b"other": b"x"})
    client.xadd(stream, {FIELD: b'{"source": "t", "symbol": "X"}'})  # lacks price and ts
    put(client, stream, good[1:])
    source = RedisStreamSource(server.url, stream=stream, block=0.1)
    sink = ListSink()
    await run_until(Flow("bad", sources=[source], sinks=[sink]), registry,
                    lambda: len(sink.records) >= 3)
    assert await source.wait_acked()
    assert sink.records == good
    assert sample(registry, "flows_records_discarded_total", "bad", "redis", reason="invalid") == 3
    assert pending(client, stream) == 0


async def test_round_trip_from_a_sink_flow_to_a_source_flow(client, stream, server, registry):
    from sources.synthetic import SyntheticMarket

    published = ListSink(name="published")
    market = SyntheticMarket(symbols=40, interval=0, limit=1000, batch_size=200)
    out = Flow("publish", sources=[market],
               sinks=[RedisStreamSink(server.url, stream=stream, batch_size=300), published])
    result, _ = await run_briefly(out)
    assert result.clean and len(published.records) == 1000

    source = RedisStreamSource(server.url, stream=stream, group="store", block=0.1)
    stored = ListSink()
    await run_until(Flow("consume", sources=[source], sinks=[stored]), registry,
                    lambda: len(stored.records) >= 1000)
    assert await source.wait_acked()
    assert stored.records == published.records
    assert pending(client, stream, "store") == 0


async def test_two_consumers_share_the_stream(client, stream, server, registry):
    data = ticks(2000)
    put(client, stream, data)
    a = RedisStreamSource(server.url, stream=stream, consumer="a", batch_size=100, block=0.1, name="a")
    b = RedisStreamSource(server.url, stream=stream, consumer="b", batch_size=100, block=0.1, name="b")
    sink = ListSink()
    await run_until(Flow("share", sources=[a, b], sinks=[sink]), registry,
                    lambda: len(sink.records) >= 2000)
    assert await a.wait_acked() and await b.wait_acked()
    assert sorted(sink.records, key=lambda t: t.ts) == data  # each entry once
    assert a.emitted > 0 and b.emitted > 0
    assert pending(client, stream) == 0


def test_rejects_bad_configuration():
    with pytest.raises(ValueError):
        RedisStreamSink(batch_size=0)
    with pytest.raises(ValueError):
        RedisStreamSink(maxlen=0)
    with pytest.raises(ValueError):
        RedisStreamSource(block=0)
    with pytest.raises(ValueError):
        RedisStreamSource(claim_idle=-1)
