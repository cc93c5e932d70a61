"""Windows and candles: equal to a brute-force computation, late records
counted and never merged, idle keys closed by the clock, restarts."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from flows import Batch, Candle, Candles, Flow, Runtime, Tick, Trade, Window
from flows.testing import ListSink, assert_component_metrics, sample

T0 = 1_700_000_040.0  # a minute boundary (12:00 of the tests)
assert T0 % 60 == 0


def brute_candles(records, every, step, key=lambda r: (r.source, r.symbol)):
    """Every window's candle, the slow obvious way: records grouped by
    window in arrival order; open/close from the earliest/latest time (ties:
    first/last arrived)."""
    hops = round(every / step)
    groups = defaultdict(list)
    for r in records:
        n = r.ts // step
        for i in range(hops):
            groups[(key(r), (n - i) * step)].append(r)
    out = []
    for (k, start), rs in groups.items():
        by_time = sorted(rs, key=lambda r: r.ts)  # stable: ties keep arrival order
        sizes = [getattr(r, "size", None) for r in rs]
        sized = [s for s in sizes if s is not None]
        volume = pv = None
        for r, s in zip(rs, sizes):
            if s is not None:
                volume = s if volume is None else volume + s
                pv = r.price * s if pv is None else pv + r.price * s
        out.append(Candle(k[0], k[1], start, every, by_time[0].price, max(r.price for r in rs),
                          min(r.price for r in rs), by_time[-1].price, volume if sized else None,
                          len(rs), pv / volume if volume else None, by_time[0].ts, by_time[-1].ts))
    return sorted(out, key=lambda c: (c.source, c.symbol, c.start))


def disordered(rng, n, lateness, symbols=("BTC", "ETH"), kind=Trade):
    """``n`` records per symbol whose arrival is at most ``lateness`` behind
    their time: sorted by time + a delay in [0, lateness)."""
    records = []
    for symbol in symbols:
        t = T0 + rng.uniform(0, 30)
        for _ in range(n):
            t += rng.choice((0.0, rng.uniform(0, 20), rng.uniform(0, 90)))
            price = round(rng.uniform(90, 110), 2)
            if kind is Trade:
                r = Trade("x", symbol, price, round(rng.uniform(0.001, 3), 3), t)
            else:
                r = Tick("x", symbol, price, t)
            records.append((t + rng.uniform(0, lateness) if lateness else t, r))
    records.sort(key=lambda p: p[0])
    return [r for _, r in records]


def batches_of(rng, records):
    out, i = [], 0
    while i < len(records):
        n = rng.randint(1, 50)
        out.append(records[i : i + n])
        i += n
    return out


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), lateness=st.sampled_from([0.0, 1.0, 5.0, 30.0]),
       every_step=st.sampled_from([(60.0, None), (60.0, 20.0), (15.0, None), (30.0, 10.0)]),
       kind=st.sampled_from([Trade, Tick]))
def test_candles_equal_a_brute_force_computation_within_the_lateness(seed, lateness, every_step, kind):
    rng = random.Random(seed)
    every, step = every_step
    records = disordered(rng, rng.randint(1, 120), lateness, kind=kind)
    candles = Candles(every=every, step=step, lateness=lateness)
    got = []
    for batch in batches_of(rng, records):
        got += candles.push(batch)
    got += candles.flush()
    assert candles.late_count == 0
    assert sorted(got, key=lambda c: (c.source, c.symbol, c.start)) == brute_candles(
        records, every, step or every)
    assert len(got) == len({(c.symbol, c.start) for c in got})  # each window once


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), lateness=st.sampled_from([0.0, 2.0, 10.0]),
       disorder=st.sampled_from([5.0, 30.0, 120.0]))
def test_beyond_the_lateness_late_trades_are_counted_and_the_rest_still_match(seed, lateness, disorder):
    """Disorder beyond the lateness (tumbling windows): each late trade is
    counted and sent on (late="emit") and went into no candle; the candles
    equal the brute-force ones of the other trades; a window is emitted
    once, before any of its late trades came."""
    step = None
    rng = random.Random(seed)
    records = disordered(rng, rng.randint(1, 120), disorder)
    candles = Candles(every=60, step=step, lateness=lateness, late="emit")
    out, emitted_at = [], {}
    for batch in batches_of(rng, records):
        for r in candles.push(batch):
            if isinstance(r, Candle):
                assert (r.symbol, r.start) not in emitted_at
                emitted_at[(r.symbol, r.start)] = len(out)
            out.append(r)
    for r in candles.flush():
        emitted_at[(r.symbol, r.start)] = len(out)
        out.append(r)
    late = [r for r in out if isinstance(r, Trade)]
    assert len(late) == candles.late_count
    late_ids = {id(r) for r in late}
    got = sorted((r for r in out if isinstance(r, Candle)), key=lambda c: (c.symbol, c.start))
    assert got == brute_candles([r for r in records if id(r) not in late_ids], 60.0, step or 60.0)
    hops = round(60.0 / (step or 60.0))
    for i, r in enumerate(out):
        if isinstance(r, Trade):  # every window it belongs to was emitted before it came
            n = r.ts // (step or 60.0)
            starts = [(n - j) * (step or 60.0) for j in range(hops)]
            assert all(emitted_at.get((r.symbol, s), -1) < i for s in starts)


@pytest.mark.parametrize(("every", "step"), [(0.1, None), (0.3, 0.1), (0.7, None), (2.1, 0.7)])
@pytest.mark.parametrize("lateness", [0.0, 0.2])
def test_fractional_widths_put_each_record_where_its_time_says(every, step, lateness):
    """Widths that are not whole seconds (not exact in binary): a record on
    a window boundary goes into the windows ``ts // step`` names, as the
    brute force puts it, and the first record of a key is never late."""
    records = [Trade("x", sym, 100.0 + i, 1.0, T0 + i * 0.05) for i in range(40) for sym in ("A",)]
    records += [Trade("x", "B", 100.0, 1.0, T0 + 0.1 * k) for k in (3, 6, 9, 12)]
    candles = Candles(every=every, step=step, lateness=lateness)
    got = []
    for i in range(0, len(records), 7):
        got += candles.push(records[i : i + 7])
    got += candles.flush()
    assert candles.late_count == 0
    assert sorted(got, key=lambda c: (c.source, c.symbol, c.start)) == brute_candles(
        records, every, step or every)


def test_late_trades_are_counted_and_never_merged():
    candles = Candles(every=60, lateness=5)
    first = [Trade("x", "BTC", 100.0, 1.0, T0 + 10), Trade("x", "BTC", 101.0, 1.0, T0 + 50)]
    assert candles.push(first) == []
    closed = candles.push([Trade("x", "BTC", 102.0, 1.0, T0 + 66)])  # watermark T0+61: closes 12:00
    assert [(c.start, c.close, c.trades) for c in closed] == [(T0, 101.0, 2)]
    late = [Trade("x", "BTC", 999.0, 5.0, T0 + 59), Trade("x", "BTC", 1.0, 5.0, T0 + 1)]
    assert candles.push(late) == []
    assert candles.late_count == 2
    rest = candles.flush()
    assert [(c.start, c.high, c.low, c.volume) for c in rest] == [(T0 + 60, 102.0, 102.0, 1.0)]


def test_a_record_within_the_lateness_still_merges():
    candles = Candles(every=60, lateness=5)
    candles.push([Trade("x", "BTC", 100.0, 1.0, T0 + 10), Trade("x", "BTC", 101.0, 1.0, T0 + 64)])
    out = candles.push([Trade("x", "BTC", 50.0, 2.0, T0 + 59.5)])  # 4.5 s behind: not late
    assert out == [] and candles.late_count == 0
    (c,) = candles.push([Trade("x", "BTC", 101.0, 1.0, T0 + 70)])
    assert (c.start, c.low, c.close, c.volume, c.trades) == (T0, 50.0, 50.0, 3.0, 2)


def test_empty_windows_carry_the_last_close():
    candles = Candles(every=60, empty="carry")
    candles.push([Trade("x", "BTC", 100.0, 1.0, T0 + 10)])
    out = candles.push([Trade("x", "BTC", 103.0, 1.0, T0 + 200)])
    assert [(c.start, c.close, c.trades, c.volume) for c in out] == [
        (T0, 100.0, 1, 1.0), (T0 + 60, 100.0, 0, 0.0), (T0 + 120, 100.0, 0, 0.0)]
    assert out[1].first_ts == out[1].last_ts == T0 + 10 and out[1].vwap is None
    skip = Candles(every=60)
    skip.push([Trade("x", "BTC", 100.0, 1.0, T0 + 10)])
    assert len(skip.push([Trade("x", "BTC", 103.0, 1.0, T0 + 200)])) == 1


def test_bad_records_are_counted_invalid_and_lose_nothing_else():
    candles = Candles(every=60)
    good = Trade("x", "BTC", 100.0, 1.0, T0 + 1)
    bad = [Trade("x", "BTC", math.nan, 1.0, T0 + 2), Trade("x", "BTC", 100.0, -1.0, T0 + 3),
           Trade("x", "BTC", 100.0, 1.0, math.inf)]
    candles.push([good, *bad])
    (c,) = candles.flush()
    assert candles.invalid_count == 3 and c.trades == 1


def test_a_generic_window_and_its_options_are_checked():
    w = Window(every=10, aggregate=lambda k, start, width, rs: (k, start, len(rs)))
    w.push([Tick("x", "A", 1.0, T0 + 1), Tick("x", "A", 1.0, T0 + 2), Tick("x", "B", 1.0, T0 + 3)])
    assert sorted(w.flush()) == [(("x", "A"), T0, 2), (("x", "B"), T0, 1)]
    with pytest.raises(ValueError, match="multiple of step"):
        Candles(every=60, step=25)
    with pytest.raises(ValueError, match="aggregate"):
        Window(every=10)


def test_max_keys_bounds_the_state():
    candles = Candles(every=60, max_keys=8)
    candles.push([Trade("x", f"S{i}", 1.0, 1.0, T0 + i) for i in range(20)])
    assert len(candles._keys) <= 8 and candles.evicted_count >= 12


# -- in a flow ---------------------------------------------------------------


class PacedTrades:
    """Source: each (clock time, trade) at that time of trio's clock, then
    stays open (a live feed gone quiet)."""

    name = "trades"

    def __init__(self, timed):
        self.timed = timed

    async def run(self, outbox):
        for at, trade in self.timed:
            await trio.sleep_until(at)
            with outbox.metrics.timed_batch():
                batch = Batch([trade])
            await outbox.send(batch)
        await trio.sleep_forever()


class TimedSink(ListSink):
    def __init__(self):
        super().__init__(name="timed")
        self.at: list[float] = []

    async def run(self, inbox):
        async for batch in inbox:
            self.records += batch.records
            self.at += [trio.current_time()] * len(batch.records)
            inbox.metrics.end_to_end.observe(0.0)
            batch.ack("written")


@pytest.mark.parametrize("lateness", [0.0, 3.0])
@pytest.mark.parametrize("kind", ["trades", "ticks"])
async def test_an_idle_keys_window_closes_on_time(autojump_clock, lateness, kind):
    """Clock time 0 is 12:00:00 (T0); the last trade is at 12:00:30; nothing
    follows. The 12:00 candle is emitted by 12:01 + lateness + margin (the
    stage's tick, 1 s), and not before 12:01 + lateness."""
    start = trio.current_time()
    make = ((lambda sym, s: Trade("x", sym, 100.0 + s, 1.0, T0 + s)) if kind == "trades"
            else (lambda sym, s: Tick("x", sym, 100.0 + s, T0 + s)))
    timed = [(start + s, make(sym, s)) for s in (0, 10, 20, 30) for sym in ("BTC", "ETH")]
    sink = TimedSink()
    flow = Flow("idle")
    flow.source(PacedTrades(timed)).then(Candles(every=60, lateness=lateness)).to(sink)
    rt = Runtime(flow, registry=(registry := __import__("prometheus_client").CollectorRegistry()),
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(600):
            while len(sink.records) < 2:
                await trio.sleep(0.1)
        rt.stop()
        nursery.cancel_scope.cancel()
    assert {(c.symbol, c.start, c.close, c.trades) for c in sink.records} == {
        ("BTC", T0, 130.0, 4), ("ETH", T0, 130.0, 4)}
    for at in sink.at:
        assert 60 + lateness <= at - start <= 60 + lateness + 1.0 + 0.01
    assert_component_metrics(registry, "idle", "candles", "stage")


async def test_late_records_go_to_a_side_stream():
    records = [Trade("x", "BTC", 100.0, 1.0, T0 + 1), Trade("x", "BTC", 101.0, 1.0, T0 + 70),
               Trade("x", "BTC", 7.0, 1.0, T0 + 2)]  # late: 12:00 closed at the second batch
    from flows.testing import ListSource, run_briefly

    flow = Flow("late")
    out = flow.source(ListSource([records[:1], records[1:2], records[2:]])).then(
        Candles(every=60, late="emit"))
    candles, late = out.split(lambda r: type(r) is Candle, name="candles")
    candle_sink, late_sink = ListSink(name="candle_sink"), ListSink(name="late_sink")
    candles.to(candle_sink)
    late.to(late_sink)
    _, registry = await run_briefly(flow)
    assert late_sink.records == [records[2]]
    assert [(c.start, c.low) for c in candle_sink.records] == [(T0, 100.0), (T0 + 60, 101.0)]
    assert sample(registry, "flows_records_discarded_total", "late", "candles", reason="late") == 1


async def test_input_acks_wait_for_the_windows_they_fed(tmp_path):
    """A source's batch is acked once the candles its trades went into are
    stored (and checkpointed), not before."""
    from flows.testing import ListSource, run_briefly

    outcomes: list[tuple[int, str]] = []

    class AckedSource(ListSource):
        async def run(self, outbox):
            for i, records in enumerate(self.batches):
                await outbox.send(Batch(records, acks=[lambda o, i=i: outcomes.append((i, o))]))

    sink = ListSink()
    records = [[Trade("x", "BTC", 100.0, 1.0, T0 + 1)], [Trade("x", "BTC", 100.0, 1.0, T0 + 61)],
               [Trade("x", "BTC", 100.0, 1.0, T0 + 2)]]  # the last is late: acked skipped
    stage = Candles(every=60, final="keep", checkpoint=tmp_path / "c.ckpt")
    await run_briefly(Flow("acks", sources=[AckedSource(records)], stages=[stage], sinks=[sink]))
    assert sorted(outcomes) == [(0, "written"), (2, "skipped")]  # batch 1's window is still open
    assert [c.start for c in sink.records] == [T0]
    again = Candles(every=60, final="keep", checkpoint=tmp_path / "c.ckpt")
    assert again.restore() == 1
    assert again.push([Trade("x", "BTC", 5.0, 1.0, T0 + 3)]) == [] and again.late_count == 1


def test_sigkill_mid_window_and_a_restart_give_the_uninterrupted_candle_table(tmp_path):
    """replay (trades) -> Candles (checkpoint every 0.1 s) -> JSONL, killed
    with SIGKILL at several points after the first checkpoint, then run to
    the end: every candle written equals the uninterrupted computation's,
    none is missing, and none was written twice with different values."""
    import json

    import msgspec
    from _cli import kill_mid_run_then_finish

    for seed, kill_after in ((1, 0.0), (2, 0.3), (3, 0.7)):
        work = tmp_path / f"seed{seed}"
        work.mkdir()
        rng = random.Random(seed)
        # 2 s of disorder against 5 s of lateness: a stall of the loaded machine
        # (the watermark also follows the wall clock) does not make a trade late
        records = disordered(rng, 300, 2.0, symbols=("BTC", "ETH", "SOL"))
        (work / "trades.jsonl").write_bytes(msgspec.json.Encoder().encode_lines(records))
        expected = {(c.symbol, c.start): c for c in brute_candles(records, 60.0, 60.0)}
        (work / "f.py").write_text(
            "import os\n"
            "from flows import Candles, Flow, Trade\n"
            "from sinks.jsonl import JSONLSink\n"
            "from sources.replay import ReplaySource\n"
            "flow = Flow('kill', sources=[ReplaySource(path='trades.jsonl', record=Trade,"
            " speed=float(os.environ['SPEED']) or None,"
            " batch_size=20, offset_every=0.1, progress=False)],\n"
            "            stages=[Candles(every=60, lateness=5, final='emit', checkpoint='candles.ckpt',"
            " checkpoint_every=0.1)],\n"
            "            sinks=[JSONLSink('candles.jsonl', flush_interval=0.3)])\n"
        )
        done = kill_mid_run_then_finish("f.py", work, speed=2000, written="candles.ckpt",
                                        kill_after=kill_after, check_running=True)
        assert done.returncode == 0, done.stderr
        written: dict[tuple[str, float], dict] = {}
        decoder = msgspec.json.Decoder(Candle)
        for line in (work / "candles.jsonl").read_bytes().splitlines():
            try:
                c = decoder.decode(line)
            except msgspec.DecodeError:
                continue  # a line the kill tore: its batch was not acked, so it came again
            seen = written.setdefault((c.symbol, c.start), json.loads(msgspec.json.encode(c)))
            assert seen == json.loads(msgspec.json.encode(c)), f"seed {seed}: {c} written twice, differently"
        assert written == {k: json.loads(msgspec.json.encode(c)) for k, c in expected.items()}, seed


def _candles_example():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "candles.py"
    spec = importlib.util.spec_from_file_location("candles_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _run_candles_example(flow, directory, seconds):
    """Run the example's ``flow`` for ``seconds``: every candle written
    equals the brute-force candle of the trades written, and changed ticks
    reach SQLite. Returns the candles."""
    import sqlite3

    import msgspec

    (stage,) = [s for s in flow.stages if isinstance(s, Candles)]
    stage.late = "emit"  # a stall of a loaded machine may make a trade late: it is written too
    with trio.fail_after(30):
        result = await Runtime(flow, registry=__import__("prometheus_client").CollectorRegistry(),
                               metrics_addr=None, duration=seconds).run()
    assert result.clean
    trades = [msgspec.json.decode(line, type=Trade)
              for line in (directory / "trades.jsonl").read_bytes().splitlines()]
    with sqlite3.connect(directory / "candles.db") as db:
        fields = ", ".join(Candle.__struct_fields__)
        candles = [Candle(*row) for row in db.execute(f"SELECT {fields} FROM candles")]
        late = set()
        if stage.late_count:  # the late trades went on to the same database, table trades
            late = {row[0] for row in db.execute("SELECT trade_id FROM trades")}
    assert len(late) == stage.late_count
    expected = {(c.symbol, c.start): c
                for c in brute_candles([t for t in trades if t.trade_id not in late], 1.0, 1.0)}
    for c in candles:
        assert c == expected[(c.symbol, c.start)]
    with sqlite3.connect(directory / "ticks.db") as db:
        assert db.execute("SELECT count(*) FROM ticks").fetchone()[0] > 0
    return candles


async def test_the_candles_example_runs_offline(tmp_path):
    """examples/candles.py with 1-second candles for a few seconds, from
    the synthetic sources."""
    flow = _candles_example().build(tmp_path, every=1.0, lateness=2.0, symbols=5, interval=0.05)
    candles = await _run_candles_example(flow, tmp_path, 4.5)
    assert len(candles) >= 5


async def test_the_candles_example_runs_on_binance_trades_from_the_emulator(tmp_path, nursery):
    """The same example on Binance's trade stream and tickers, served by
    the exchange emulator: candles of every pair, from its trades."""
    from flows.testing.emulator import Emulator

    emulator = Emulator(seed=4, assets=10, tick_interval=0.1, ws_rate=20.0)
    url = await nursery.start(emulator.serve)
    example = _candles_example()
    flow = example.build(tmp_path, exchange_url=url, every=1.0, lateness=1.0, interval=0.1)
    assert {a.name for a in flow.sources} == {"binance_trades", "binance"}
    candles = await _run_candles_example(flow, tmp_path, 4.5)
    assert {c.source for c in candles} == {"binance_trades"}
    assert {c.symbol for c in candles} == set(example.PAIRS)


def test_a_corrupt_or_foreign_checkpoint_is_ignored(tmp_path, caplog):
    path = tmp_path / "c.ckpt"
    for data in (b"\x00garbage", b"\xa3abc", __import__("msgspec").msgpack.encode(
            {"version": 9, "kind": "flows.Window", "entries": []})):
        path.write_bytes(data)
        stage = Candles(every=60, checkpoint=path)
        assert stage.restore() == 0
        assert stage.push([Trade("x", "BTC", 1.0, 1.0, T0 + 1)]) == []  # starts empty, works
    assert "unusable" in caplog.text


async def test_a_fresh_run_ignores_the_checkpoint(tmp_path):
    from flows.testing import ListSource, run_briefly

    path = tmp_path / "c.ckpt"
    first = Candles(every=60, checkpoint=path, final="emit")
    await run_briefly(Flow("f", sources=[ListSource([[Trade("x", "BTC", 1.0, 1.0, T0 + 1)]])],
                           stages=[first], sinks=[ListSink()]))
    assert path.exists()
    again = [Trade("x", "BTC", 2.0, 1.0, T0 + 2)]
    kept, fresh = Candles(every=60, checkpoint=path, final="emit"), Candles(every=60, checkpoint=path,
                                                                            final="emit")
    out = {}
    for name, stage in (("kept", kept), ("fresh", fresh)):
        sink = ListSink()
        await run_briefly(Flow("f", sources=[ListSource([again])], stages=[stage], sinks=[sink]),
                          fresh=name == "fresh")
        out[name] = sink.records
    assert out["kept"] == [] and kept.late_count == 1  # the 12:00 candle is stored already
    assert [c.close for c in out["fresh"]] == [2.0]


async def test_the_checkpoint_never_passes_a_window_a_sink_gave_up_on(tmp_path):
    """A candle acked ``failed`` holds its key's checkpoint before it, even
    when later candles of that key are stored: a restart rebuilds it."""
    from flows.testing import ListSource, run_briefly

    class FailFirst(ListSink):
        async def run(self, inbox):
            async for batch in inbox:
                first = not self.batches
                self.batches += 1
                self.records += batch.records
                inbox.metrics.end_to_end.observe(0.0)
                batch.ack("failed" if first else "written")

    records = [[Trade("x", "BTC", 1.0, 1.0, T0 + 1)], [Trade("x", "BTC", 2.0, 1.0, T0 + 61)],
               [Trade("x", "BTC", 3.0, 1.0, T0 + 121)], [Trade("x", "BTC", 4.0, 1.0, T0 + 181)]]
    path = tmp_path / "c.ckpt"
    sink = FailFirst()
    await run_briefly(Flow("fail", sources=[ListSource(records)],
                           stages=[Candles(every=60, checkpoint=path)], sinks=[sink]))
    assert [c.start for c in sink.records] == [T0, T0 + 60, T0 + 120]
    again = Candles(every=60, checkpoint=path)
    again.restore()
    (rebuilt,) = again.push([Trade("x", "BTC", 1.0, 1.0, T0 + 1), Trade("x", "BTC", 9.0, 1.0, T0 + 70)])
    assert (rebuilt.start, again.late_count) == (T0, 0)


def test_an_idle_key_never_runs_ahead_of_the_stream():
    """A slow replay (sinks holding it back): 10 s of clock pass between
    batches that advance event time by 1 s. A key missing from a few
    batches keeps its window open until the stream itself passes its end:
    its next trade, 2 s of event time later, still counts."""
    candles = Candles(every=60, lateness=2)
    candles.push([Trade("x", "A", 1.0, 1.0, T0 + 57), Trade("x", "B", 1.0, 1.0, T0 + 57)], now=0)
    for i in range(1, 4):  # only B trades, 1 s of event time per 10 s of clock
        assert candles.push([Trade("x", "B", 1.0, 1.0, T0 + 57 + i)], now=10 * i) == []
        assert candles.advance(10 * i) == []
    candles.push([Trade("x", "A", 2.0, 1.0, T0 + 59)], now=40)
    assert candles.late_count == 0
    (a,) = [c for c in candles.flush() if c.symbol == "A"]
    assert (a.trades, a.close) == (2, 2.0)
