"""Gap records: every lost connection, lost update, failed poll and open
circuit is counted, logged, kept in /status and sent down flow.gaps()."""

from __future__ import annotations

import pytest
import trio
from _http_sources import OK, Probe, http, run_until, serve_answers
from _streams import feed_starter, until
from prometheus_client import CollectorRegistry

from flows import Batch, CircuitBreaker, Flow, Gap, Retry, Runtime, Tick
from flows.testing import ListSink, sample
from sources.binance import BinanceStream


class Reporting:
    """A finite source that reports one gap, then sends one batch."""

    name = "reporting"

    async def run(self, outbox) -> None:
        outbox.gap(["A", "B"], 10.0, 12.5, "silent")
        await outbox.send(Batch([Tick("reporting", "A", 1.0, 13.0)]))


async def test_gaps_are_counted_kept_and_streamed_and_the_stream_ends_with_the_sources(registry, caplog):
    ticks, gaps = ListSink(name="ticks"), ListSink(name="gaps_sink")
    flow = Flow("g")
    flow.source(Reporting()).to(ticks)
    flow.gaps().to(gaps)
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    result = await rt.run()
    assert result.clean and result.reason == "exhausted"  # the gap stream ended too
    assert gaps.records == [Gap("reporting", ("A", "B"), 10.0, 12.5, "silent")]
    assert len(ticks.records) == 1
    assert sample(registry, "flows_gaps_total", "g", "reporting", reason="silent") == 1
    status = rt.status()["gaps"]
    assert status["total"] == {"silent": 1}
    assert status["recent"][0] == {"source": "reporting", "symbols": ["A", "B"], "start": 10.0,
                                   "end": 12.5, "reason": "silent"}
    assert "gap in reporting (silent): A, B for 2.5s" in caplog.text
    assert "gaps" not in {a["name"] for a in rt.status()["actors"] if "freshness" in a}


async def test_without_a_gap_stream_gaps_are_still_counted_and_kept(registry):
    flow = Flow("nog", sources=[Reporting()], sinks=[ListSink()])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    await rt.run()
    assert rt.status()["gaps"]["total"] == {"silent": 1}


async def test_a_failed_poll_and_an_open_circuit_are_gaps(nursery, autojump_clock):
    script = [OK, http(500), http(500), http(500)]
    times: list[float] = []

    def answer(head):
        times.append(trio.current_time())
        return script.pop(0) if script else OK

    url = await serve_answers(nursery, answer, lambda head: None)
    source = Probe(symbols=["A", "B"], base_url=url, every=1.0, retry=Retry(attempts=1),
                   circuit=CircuitBreaker(failures=2, reset_after=5.0))
    gaps = ListSink(name="gaps_sink")
    registry = CollectorRegistry()
    flow = Flow("hg")
    flow.source(source).to(ListSink())
    flow.gaps().to(gaps)
    await run_until(flow, lambda: any(g.reason == "circuit_open" for g in gaps.records),
                    registry, timeout=60)
    reasons = [g.reason for g in gaps.records]
    assert reasons.count("poll_failed") == 3 and reasons[-1] == "circuit_open"
    first = gaps.records[0]
    assert first.symbols == ("A", "B") and first.end > first.start  # from the last good poll
    circuit = gaps.records[-1]
    assert circuit.symbols is None and circuit.end - circuit.start >= 5.0
    assert sample(registry, "flows_gaps_total", "hg", "probe", reason="poll_failed") == 3


@pytest.fixture
def start(nursery):
    return feed_starter(nursery, "", seed=4)


async def test_a_lost_connection_is_a_gap_from_down_to_back(start, autojump_clock):
    emulator, url = await start()
    symbols = emulator.symbols("binance")[:3]
    source = BinanceStream(symbols=symbols, channel="miniTicker", base_url=url)
    gaps, ticks = ListSink(name="gaps_sink"), ListSink()
    flow = Flow("wg")
    flow.source(source).to(ticks)
    flow.gaps().to(gaps)
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        await until(lambda: len(ticks.records) > 0)
        before = source._wall.now()  # the source's epoch clock, which follows trio's mock clock
        emulator.ws.disconnect("abrupt")
        await until(lambda: len(gaps.records) > 0)
        rt.stop()
    (gap,) = gaps.records
    assert gap.source == "binance_stream" and set(gap.symbols) == set(symbols)
    assert gap.reason in ("closed", "error") and before <= gap.start <= gap.end


async def test_a_rate_limited_poll_is_a_gap_to_the_end_of_its_pause(nursery, autojump_clock):
    """A 429 with Retry-After pauses the source: no data comes for that long, so
    the gap runs from the last good poll to the end of the pause."""
    script = [OK, http(429, retry_after=20)]
    url = await serve_answers(nursery, lambda head: script.pop(0) if script else OK,
                              lambda head: None)
    source = Probe(symbols=["A"], base_url=url, every=1.0)
    gaps = ListSink(name="gaps_sink")
    flow = Flow("rl")
    flow.source(source).to(ListSink())
    flow.gaps().to(gaps)
    await run_until(flow, lambda: bool(gaps.records), timeout=60)
    (gap,) = gaps.records
    assert gap.reason == "rate_limited" and gap.symbols == ("A",)
    assert 20.0 <= gap.end - gap.start <= 22.0  # from the last good poll, through the pause


async def test_a_symbol_polled_again_after_stale_after_records_the_whole_silence(
        nursery, autojump_clock):
    """However a poll was held up (here a 429 pause longer than stale_after), a
    symbol that answers after more than stale_after without data says so: one
    'stale' gap from its last good poll to the answer."""
    script = [OK, http(429, retry_after=5)]
    url = await serve_answers(nursery, lambda head: script.pop(0) if script else OK,
                              lambda head: None)
    source = Probe(symbols=["A"], base_url=url, every=1.0)
    source.stale_after = 3.0
    gaps, ticks = ListSink(name="gaps_sink"), ListSink()
    flow = Flow("st")
    flow.source(source).to(ticks)
    flow.gaps().to(gaps)
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(60):
            while not any(g.reason == "stale" for g in gaps.records):
                await trio.sleep(0.1)
        await trio.sleep(4)  # more good polls
        rt.stop()
    (stale,) = [g for g in gaps.records if g.reason == "stale"]
    assert stale.symbols == ("A",) and 5.0 <= stale.end - stale.start <= 7.0
    assert [g.reason for g in gaps.records].count("stale") == 1  # once, not every later poll
