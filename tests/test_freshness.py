"""A feed never silently stops: the age of each source's last valid record,
stale symbols (counted, never labels), /readyz, /status, the top view, and
a change detector whose heartbeat never makes a dead symbol look alive."""

from __future__ import annotations

import io

import pytest
import trio
import trio.testing

from flows import Batch, ChangeDetector, Flow, Runtime, Tick
from flows._freshness import DEFAULT_STALE_AFTER, stale_after_for
from flows.testing import ListSink, sample


class Pushed:
    """A source that sends what the test pushes, then waits for more."""

    def __init__(self, name: str = "feed", **attrs) -> None:
        self.name = name
        self.send, self._receive = trio.open_memory_channel(100)
        self.__dict__.update(attrs)

    async def run(self, outbox) -> None:
        async for records in self._receive:
            await outbox.send(Batch(records))


def ticks(*symbols: str, ts: float = 1.0) -> list[Tick]:
    return [Tick("feed", s, 100.0, ts) for s in symbols]


async def test_a_source_that_goes_silent_turns_the_flow_stale_and_back(registry, autojump_clock):
    source = Pushed(stale_after=30.0)
    rt = Runtime(Flow("silent", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await source.send.send(ticks("A", "B", "C"))
        await trio.sleep(10)
        assert rt.ready() == (True, [])
        await source.send.send(ticks("A", "B"))  # C goes quiet
        await trio.sleep(25)
        assert rt.ready()[0]  # the source is alive: only a symbol is stale
        status = next(a for a in rt.status()["actors"] if a["name"] == "feed")
        assert status["freshness"]["stale_symbols"] == 1
        assert status["freshness"]["stalest"][0]["symbol"] == "C"
        assert sample(registry, "flows_source_stale_symbols", "silent", "feed") == 1
        assert sample(registry, "flows_source_symbols", "silent", "feed") == 3
        await trio.sleep(10)  # now nothing for 35 s
        ready, reasons = rt.ready()
        assert not ready and reasons == ["source feed: stale (no valid record for 35s, stale_after 30s)"]
        assert sample(registry, "flows_source_last_record_age_seconds", "silent", "feed") >= 35
        assert sample(registry, "flows_source_stale_after_seconds", "silent", "feed") == 30
        await source.send.send(ticks("A", "B", "C"))
        await trio.testing.wait_all_tasks_blocked()
        assert rt.ready() == (True, [])
        assert sample(registry, "flows_source_stale_symbols", "silent", "feed") == 0
        rt.stop()


async def test_a_source_that_never_sends_is_stale_after_the_start(registry, autojump_clock):
    source = Pushed(stale_after=5.0)
    rt = Runtime(Flow("never", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.sleep(6)
        assert "source feed: stale (no valid record yet for 6s, stale_after 5s)" in rt.ready()[1]
        rt.stop()


def test_stale_after_defaults_follow_the_poll_interval():
    class Polled:
        name, every = "p", 30.0

    class Synthetic:
        name, interval = "s", 0.5

    assert stale_after_for(Polled()) == 90.0
    assert stale_after_for(Synthetic()) == DEFAULT_STALE_AFTER
    assert stale_after_for(Pushed(stale_after=2)) == 2.0


def test_no_symbol_becomes_a_label():
    from flows import METRICS

    for name in ("flows_source_stale_symbols", "flows_source_symbols",
                 "flows_source_last_record_age_seconds"):
        assert METRICS[name].labels == ()


def test_top_names_the_stalest_symbols():
    from rich.console import Console

    from flows import top

    actor = {"name": "feed", "kind": "source", "state": "running", "sent": 3, "received": 0,
             "restarts": 0, "discarded": {}, "errors": {},
             "freshness": {"age_seconds": 1.0, "stale_after": 30, "symbols": 3, "stale_symbols": 2,
                           "stalest": [{"symbol": "C", "age_seconds": 95.0},
                                       {"symbol": "B", "age_seconds": 40.0}]}}
    status = {"flow": "f", "state": "running", "uptime_seconds": 100.0, "ready": True,
              "actors": [actor], "edges": []}
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(top.render("http://h:1", top.Sample(status, True, [], 0.0), None, None, 1.0,
                             live=False))
    assert "2 stale symbols (oldest: C 0:01:35, B 0:00:40)" in console.export_text()


async def test_the_heartbeat_never_makes_a_dead_symbol_look_alive(registry, autojump_clock):
    """Heartbeats ride on fresh input: a symbol whose feed died (no record,
    or the same stale record again and again) is never re-emitted."""
    source = Pushed()
    sink = ListSink()
    flow = Flow("hb", sources=[source], stages=[ChangeDetector(heartbeat=10.0)], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await source.send.send(ticks("DEAD", "LIVE", ts=0.0))
        for second in range(1, 60):
            await trio.sleep(1)
            # LIVE moves on in time; DEAD's API keeps answering its last, old record
            await source.send.send(ticks("LIVE", ts=float(second)) + ticks("DEAD", ts=0.0))
        await trio.testing.wait_all_tasks_blocked()
        dead = [t for t in sink.records if t.symbol == "DEAD"]
        live = [t.ts for t in sink.records if t.symbol == "LIVE"]
        assert len(dead) == 1
        assert live == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]  # LIVE's heartbeats, on its fresh input
        rt.stop()


async def test_repeated_batches_keep_every_symbol_fresh_and_a_changed_one_is_noticed(autojump_clock):
    """A source repeating its symbols in the same order is stamped once per
    batch: the symbol times still follow each batch, and a batch of the
    same length, first and last symbol but another symbol in the middle is
    not taken for a repeat."""
    from flows._freshness import Freshness

    fresh = Freshness(stale_after=30.0)
    universe = [f"S{i:02d}" for i in range(40)]
    for _ in range(3):
        fresh.seen(ticks(*universe))
        await trio.sleep(1)
    swapped = universe[:20] + ["NEW"] + universe[21:]  # S20 leaves, NEW arrives
    fresh.seen(ticks(*swapped))
    await trio.sleep(20)
    fresh.seen(ticks(*swapped))  # a repeat: S20 stays behind
    await trio.sleep(15)
    assert fresh.stalest(2)[0] == ("S20", 36.0)  # last seen at 2 s, now 38 s
    assert fresh.stalest(2)[1][1] == 15.0
    assert fresh.stale_symbols() == 1
    assert fresh.figures()["symbols"] == 41
    assert fresh.times()["S05"] == fresh.times()["NEW"] == trio.current_time() - 15


@pytest.mark.parametrize(("limits", "grain"), [(None, 0.0), ((2, 40), 0.0), (None, 1.0),
                                               ((2, 40), 1.0)],
                         ids=["exact", "exact-few-runs", "probed", "probed-few-runs"])
async def test_symbol_times_match_a_record_by_record_reference(autojump_clock, monkeypatch, limits,
                                                               grain):
    """Random batches (repeats, near repeats, short, mixed and unhashable
    symbols) against a plain dict updated record by record; also with room
    for only a few runs (remembered runs are dropped and settled often).
    Without a grain the times are exact; with one (repeats probed between
    full comparisons) a time is never later than the reference (a dead
    symbol never looks alive), and less than a grain earlier when the batches
    of its shape (length, first and last symbol) never varied."""
    import random

    from flows import _freshness
    from flows._freshness import Freshness

    if limits is not None:
        monkeypatch.setattr(_freshness, "_RUNS_MAX", limits[0])
        monkeypatch.setattr(_freshness, "_RUN_SYMBOLS_MAX", limits[1])
    monkeypatch.setattr(_freshness, "_GRAIN", grain)
    monkeypatch.setattr(_freshness, "_STRICT", 4)

    class Bare:  # a record without a symbol
        pass

    rng = random.Random(15)
    fresh = Freshness(stale_after=10.0)
    probed = 0
    reference: dict = {}
    shapes = [[f"S{rng.randrange(60)}" for _ in range(rng.choice((3, 16, 20, 30)))]
              for _ in range(6)]
    def key(symbols: list[str]) -> tuple:
        return len(symbols), symbols[0], symbols[-1]

    varied = {key(a) for a in shapes for b in shapes if key(a) == key(b) and a != b}
    last_in: dict = {}  # symbol -> the shape of the batch it was last in
    for _ in range(400):
        symbols = list(rng.choice(shapes))
        if rng.random() < 0.2 and len(symbols) > 2:
            symbols[rng.randrange(1, len(symbols) - 1)] = f"S{rng.randrange(80)}"
            varied.add(key(symbols))
        records = ticks(*symbols)
        if rng.random() < 0.05:
            records[rng.randrange(1, len(records))] = Bare()
        if rng.random() < 0.05:
            records[-1] = Tick("feed", ["unhashable"], 1.0, 1.0)  # type: ignore[arg-type]
        fresh.seen(records)
        now = trio.current_time()
        if hasattr(records[0], "symbol"):
            for r in records:
                s = getattr(r, "symbol", None)
                if s is not None and not isinstance(s, list):
                    reference[s] = now
                    last_in[s] = key(symbols)
        times = fresh.times()
        if not grain:
            assert times == reference
        else:
            assert all(t <= reference[s] for s, t in times.items())
            steady = {s for s in reference if last_in[s] not in varied}
            assert all(reference[s] - grain < times[s] for s in steady)
            probed += times != reference
        await trio.sleep(rng.choice((0.0, 0.3, 0.5, 3.0)))
    assert not grain or probed >= 5  # the probed path was taken
