"""flows.Retry: the schedule itself, and each user following the policy it is
given (HTTP source and websocket source against the emulator, the Redis
source against a real redis-server, a sink against a locked SQLite file)."""

from __future__ import annotations

import itertools
import random
import sqlite3

import pytest
import trio
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, FlowFailed, Retry, Runtime, Supervision, Tick
from flows.testing import (
    ListSink,
    ListSource,
    run_briefly,
    running_source,
    sample,
    wait_until,
)
from flows.testing.emulator import Emulator
from sinks.sqlite import SQLiteSink
from sources.binance import BinanceStream, BinanceTickers

# -- the schedule ------------------------------------------------------------


def test_the_cap_starts_at_backoff_doubles_and_stops_at_max_backoff():
    policy = Retry(backoff=0.25, max_backoff=3.0)
    assert [policy.cap(n) for n in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.cap(10_000) == 3.0  # no overflow however long it has been failing


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_wait_is_full_jitter_below_its_cap(seed):
    policy = Retry(backoff=1.0, max_backoff=8.0)
    rng = random.Random(seed)
    draws = [list(itertools.islice(policy.delays(rng), 6)) for _ in range(2000)]
    for n in range(6):
        waits = [d[n] for d in draws]
        cap = policy.cap(n)
        assert all(0 <= w <= cap for w in waits), n
        # full jitter: the whole range [0, cap] is used (not [cap/2, cap])
        assert min(waits) < 0.05 * cap and max(waits) > 0.95 * cap, n
        assert 0.45 * cap < sum(waits) / len(waits) < 0.55 * cap, n


def test_a_seeded_random_source_makes_the_waits_reproducible():
    policy = Retry(attempts=6, backoff=0.5, max_backoff=2.0)
    first = list(policy.delays(random.Random(42)))
    assert first == list(policy.delays(random.Random(42)))
    rng = random.Random(42)
    assert first == [rng.uniform(0, c) for c in (0.5, 1.0, 2.0, 2.0, 2.0)]


@pytest.mark.parametrize(("attempts", "waits"), [(1, 0), (2, 1), (4, 3)])
def test_a_finite_policy_gives_attempts_minus_one_waits(attempts, waits):
    policy = Retry(attempts=attempts)
    assert len(list(policy.delays())) == waits


def test_attempts_none_retries_forever():
    policy = Retry(backoff=0.01, max_backoff=0.02)
    assert len(list(itertools.islice(policy.delays(), 10_000))) == 10_000


def test_a_new_run_starts_over_at_backoff():
    policy = Retry(backoff=0.5, max_backoff=100.0)
    run = policy.delays(random.Random(1))
    worn = list(itertools.islice(run, 8))  # the cap is 64 s by now
    assert max(worn) > 0.5
    for seed in range(50):  # a new run's first wait is below backoff again
        assert next(policy.delays(random.Random(seed))) <= 0.5


def test_bad_policies_are_refused():
    with pytest.raises(ValueError, match="max_backoff"):
        Retry(backoff=5, max_backoff=1)
    with pytest.raises(ValueError):
        Retry(attempts=0)
    with pytest.raises(ValueError):
        Retry(backoff=-1)
    with pytest.raises(TypeError):
        Retry(3)  # keyword-only


# -- the users -----------------------------------------------------------------


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=5, assets=20, tick_interval=0)
    em.url = await nursery.start(em.serve)
    return em


class TimedTickers(BinanceTickers):
    """Notes the trio time of every response."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.answered: list[float] = []

    def on_response(self, response) -> None:
        self.answered.append(trio.current_time())
        super().on_response(response)


async def test_an_http_source_gives_up_after_the_policys_attempts(emulator, autojump_clock):
    symbols = emulator.symbols("binance")[:3]
    policy = Retry(attempts=4, backoff=1.0, max_backoff=2.0)
    source = TimedTickers(symbols=symbols, base_url=emulator.url, per_request=3, every=1000.0,
                          retry=policy, circuit=CircuitBreaker(failures=100))
    emulator.set_faults(exchange="binance", error_rate=1.0)
    async with running_source(source, flow="rt") as (_, _, registry):
        await wait_until(lambda: sample(registry, "flows_records_discarded_total", "rt", "binance",
                                        reason="request_failed") == 3,
                         timeout=60, what="the failed request's 3 symbols counted")
        await trio.sleep(100)  # no further try before the next cycle (at t=1000)
    assert emulator.stats["binance"]["ticker/price"]["requests"] == 4
    assert sample(registry, "flows_source_retries_total", "rt", "binance") == 3
    gaps = [b - a for a, b in itertools.pairwise(source.answered)]
    assert len(gaps) == 3
    for n, gap in enumerate(gaps):  # the waits lie within the schedule (plus the limiter's pacing)
        assert 0 <= gap <= policy.cap(n) + 0.1, (n, gaps)


async def test_a_stream_source_gives_up_after_attempts_connections_without_data(
    emulator, autojump_clock
):
    url = emulator.url.replace("http://", "ws://")
    source = BinanceStream(symbols=["NOSUCHUSDT"], base_url=url,
                           retry=Retry(attempts=3, backoff=0.5, max_backoff=1.0))
    flow = Flow("ws", sources=[source], sinks=[ListSink()], supervision=Supervision(max_restarts=0))
    registry = CollectorRegistry()
    with trio.fail_after(60), pytest.raises(FlowFailed, match="giving up"):
        await Runtime(flow, registry=registry, metrics_addr=None).run()
    assert emulator.stats["binance"]["ws"]["rejected"] == 3
    assert sample(registry, "flows_source_reconnects_total", "ws", "binance_stream",
                  reason="error") == 3


async def test_a_connection_that_delivered_starts_a_new_run_of_tries(emulator, autojump_clock):
    url = emulator.url.replace("http://", "ws://")
    symbols = emulator.symbols("binance")[:2]
    # two attempts: without the reset, the second drop in a row would end the source
    source = BinanceStream(symbols=symbols, base_url=url,
                           retry=Retry(attempts=2, backoff=0.1, max_backoff=0.1))
    async with running_source(source, flow="ws", supervision=Supervision(max_restarts=0)) as (
        rt, sink, registry
    ):
        for drop in range(1, 5):
            seen = len(sink.records)
            await wait_until(lambda seen=seen: len(sink.records) > seen, timeout=60,
                             what=f"records on connection {drop}")
            assert emulator.ws.disconnect(how="close") == 1
            await wait_until(lambda drop=drop: sample(registry, "flows_source_reconnects_total", "ws",
                                                      "binance_stream", reason="server") == drop,
                             timeout=60, what=f"reconnect {drop} counted")
        await wait_until(lambda: len(emulator.ws.connections) == 1, timeout=60,
                         what="the fifth connection")
        slot = next(s for s in rt.slots if s.actor is source)
        assert slot.state == "running" and slot.restarts == 0


async def test_a_sink_gives_up_after_the_policys_attempts(tmp_path):
    db = tmp_path / "t.db"
    SQLiteSink(db)._connect().close()  # create the table
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")  # every write fails: database is locked (transient)
    try:
        sink = SQLiteSink(db, busy_timeout=0.01, retry=Retry(attempts=3, backoff=0.01, max_backoff=0.01))
        ticks = [Tick("t", f"S{i}", 1.0 + i, 1_700_000_000.0 + i) for i in range(10)]
        flow = Flow("locked", sources=[ListSource([ticks])], sinks=[sink])
        _, registry = await run_briefly(flow)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert sample(registry, "flows_sink_write_errors_total", "locked", "sqlite") == 3
    assert sample(registry, "flows_sink_retries_total", "locked", "sqlite") == 2
    assert sample(registry, "flows_records_discarded_total", "locked", "sqlite",
                  reason="write_failed") == 10


async def test_the_redis_source_gives_up_after_the_policys_attempts(caplog):
    redis = pytest.importorskip("redis", reason="redis-py is not installed")
    from flows.testing.redis import RedisServer, redis_server_path
    if redis_server_path() is None:
        pytest.skip("redis-server is not installed")
    import msgspec

    from sinks.redis import FIELD
    from sources.redis import RedisStreamSource

    server = RedisServer().start()  # real time: the source's calls run in threads
    try:
        with redis.Redis.from_url(server.url, protocol=2) as client:
            for i in range(5):
                client.xadd("s", {FIELD: msgspec.json.encode(Tick("t", f"S{i}", 1.0, 1.7e9 + i))})
        source = RedisStreamSource(server.url, stream="s", claim_idle=None, block=0.1, ack_linger=1.0,
                                   retry=Retry(attempts=3, backoff=0.01, max_backoff=0.02))
        sink, registry, failed = ListSink(), CollectorRegistry(), []
        flow = Flow("rd", sources=[source], sinks=[sink], supervision=Supervision(max_restarts=0))

        async def run() -> None:
            try:
                await Runtime(flow, registry=registry, metrics_addr=None).run()
            except FlowFailed as exc:
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_until(lambda: len(sink.records) == 5, timeout=10, what="the 5 entries read")
            assert await source.wait_acked(5.0)
            await trio.to_thread.run_sync(server.stop)  # Redis goes away for good
            await wait_until(lambda: failed, timeout=10, what="the source to give up")
    finally:
        server.stop()
    assert "ConnectionError" in str(failed[0])
    errors = sum(sample(registry, "flows_errors_total", "rd", "redis", error_type=kind)
                 for kind in ("ConnectionError", "TimeoutError"))
    assert errors == 3 + 1  # the policy's 3 tries, and the crash the runtime counts
    retried = [r for r in caplog.records if "redis call failed" in r.getMessage()]
    assert len(retried) == 2
