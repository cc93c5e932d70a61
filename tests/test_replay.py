"""sources.replay: formats, bad lines, pacing, resume offsets, progress."""

from __future__ import annotations

import csv
import json
import logging
import sys
from pathlib import Path

import msgspec
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from flows import Edge, Flow, FlowFailed, Runtime, Supervision, Tick
from flows.testing import (
    GatedSink,
    ListSink,
    assert_component_metrics,
    deadline,
    run_briefly,
    sample,
    wait_until,
)
from sources.replay import OffsetTracker, ReplaySource, count_lines

LOGGER = "flows.source.replay"
T0 = 1_700_000_000.0


def make_ticks(n: int, *, per_ts: int = 1, step: float = 1.0, source: str = "rec") -> list[Tick]:
    ticks = []
    for i in range(n):
        k = i // per_ts
        bid = 100.0 + i - 0.5 if i % 2 else None
        ticks.append(
            Tick(source, f"S{i % max(per_ts, 4)}USDT", 100.0 + i, T0 + k * step,
                 bid=bid, ask=None, volume=float(i) if i % 3 else None)
        )
    return ticks


def write_jsonl(path, ticks: list[Tick]) -> None:
    path.write_bytes(msgspec.json.Encoder().encode_lines(ticks))


def write_csv(path, ticks: list[Tick], *, with_source: bool = True) -> None:
    columns = ["ts", "symbol", "price", "bid", "ask", "volume"]  # not the Tick field order
    if with_source:
        columns.append("source")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for t in ticks:
            w.writerow(["" if getattr(t, c) is None else repr(getattr(t, c)) if c != "symbol"
                        and c != "source" else getattr(t, c) for c in columns])


def read_offset(source: ReplaySource) -> dict:
    return json.loads(source.offset_path.read_bytes())


async def replay(source: ReplaySource, **options):
    sink = ListSink()
    result, registry = await run_briefly(Flow("rp", sources=[source], sinks=[sink]), **options)
    return result, registry, sink


# -- formats -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".ndjson"])
async def test_jsonl_replays_every_tick_in_order_in_batches(tmp_path, suffix):
    ticks = make_ticks(25)
    path = tmp_path / f"ticks{suffix}"
    write_jsonl(path, ticks)
    source = ReplaySource(path=path, batch_size=10)
    result, registry, sink = await replay(source)
    assert result.clean and result.reason == "exhausted"
    assert sink.records == ticks
    assert sink.batches == 3  # 10 + 10 + 5
    assert_component_metrics(registry, "rp", "replay", "source")
    assert sample(registry, "flows_records_sent_total", "rp", "replay") == 25
    assert read_offset(source)["line"] == 25
    assert source.offset == 25


@pytest.mark.parametrize("with_source", [True, False])
async def test_csv_replays_every_tick_in_order_in_batches(tmp_path, with_source):
    ticks = make_ticks(25, source="ticks" if not with_source else "rec")
    path = tmp_path / "ticks.csv"
    write_csv(path, ticks, with_source=with_source)
    source = ReplaySource(path=path, batch_size=10)  # no source column: the file's stem
    result, registry, sink = await replay(source)
    assert result.clean and result.reason == "exhausted"
    assert sink.records == ticks
    assert sink.batches == 3
    assert_component_metrics(registry, "rp", "replay", "source")
    assert read_offset(source)["line"] == 26  # the header is a line too


async def test_csv_source_parameter_fills_missing_sources(tmp_path):
    path = tmp_path / "export.csv"
    path.write_text("source,symbol,price,ts\n,BTCUSDT,1.5,1700000010\nkraken,ETHUSDT,2,1700000011\n")
    _, _, sink = await replay(ReplaySource(path=path, source="archive"))
    assert sink.records == [Tick("archive", "BTCUSDT", 1.5, T0 + 10), Tick("kraken", "ETHUSDT", 2.0, T0 + 11)]


async def test_format_overrides_the_extension(tmp_path):
    ticks = make_ticks(5)
    path = tmp_path / "ticks.log"
    write_jsonl(path, ticks)
    _, _, sink = await replay(ReplaySource(path=path, format="jsonl"))
    assert sink.records == ticks


def test_unknown_extension_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"'\.txt'.*\.jsonl.*\.csv.*format="):
        ReplaySource(path=tmp_path / "ticks.txt")
    with pytest.raises(ValueError, match="extension '\\(none\\)'"):
        ReplaySource(path=tmp_path / "ticks")
    with pytest.raises(ValueError):
        ReplaySource(path=tmp_path / "ticks.csv", format="xml")


def test_rejects_bad_configuration(tmp_path):
    path = tmp_path / "t.jsonl"
    for bad in ({"speed": 0}, {"speed": -1.0}, {"speed": float("nan")}, {"batch_size": 0},
                {"offset_every": -1}, {"progress_every": -1}):
        with pytest.raises(ValueError):
            ReplaySource(path=path, **bad)
    assert ReplaySource(path=path).offset_path == tmp_path / "t.jsonl.offset"
    assert ReplaySource(path=path, offset_path=None).offset_path is None


async def test_csv_without_required_columns_fails_the_flow_clearly(tmp_path, autojump_clock):
    path = tmp_path / "ticks.csv"
    path.write_text("symbol,ts\nBTCUSDT,1\n")
    flow = Flow("rp", sources=[ReplaySource(path=path)], sinks=[ListSink()],
                supervision=Supervision(max_restarts=0))
    with pytest.raises(FlowFailed, match="lacks the column\\(s\\) price"):
        await run_briefly(flow)


# -- bad lines -----------------------------------------------------------------


async def test_malformed_jsonl_lines_are_counted_and_skipped(tmp_path, caplog):
    good = make_ticks(3)
    enc = msgspec.json.Encoder()
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(b"\n".join([
        enc.encode(good[0]),
        b"{not json",
        b'{"source":"rec","symbol":"BTCUSDT","ts":1.0}',  # no price
        b'{"source":"rec","symbol":"BTCUSDT","price":"abc","ts":1.0}',
        b"",  # blank: neither a tick nor invalid
        enc.encode(good[1]),
        b'{"source":"rec","symbol":"BTCUSDT","price":-1.0,"ts":1700000000.0}',  # check_tick
        enc.encode(good[2]),
    ]) + b"\n")
    source = ReplaySource(path=path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result, registry, sink = await replay(source)
    assert result.clean
    assert sink.records == [good[0], good[1], good[2]]
    assert sample(registry, "flows_records_discarded_total", "rp", "replay", reason="invalid") == 4
    drops = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert drops and "invalid" in drops[0] and "ticks.jsonl:2" in drops[0]
    assert len(drops) == 1  # rate-limited: the others are summed into the next line
    assert read_offset(source)["line"] == 8


async def test_malformed_csv_rows_are_counted_and_skipped(tmp_path):
    path = tmp_path / "ticks.csv"
    path.write_text(
        "source,symbol,price,ts,bid\n"
        "a,BTCUSDT,1.5,1700000010,\n"
        "a,BTCUSDT,abc,1700000011,\n"  # price not a number
        "a,BTCUSDT,,1700000012,\n"  # no price
        "a,BTCUSDT,2.5\n"  # too few cells
        "\n"
        "a,ETHUSDT,3.5,1700000013,3.4\n"
    )
    _, registry, sink = await replay(ReplaySource(path=path))
    assert sink.records == [Tick("a", "BTCUSDT", 1.5, T0 + 10), Tick("a", "ETHUSDT", 3.5, T0 + 13, bid=3.4)]
    assert sample(registry, "flows_records_discarded_total", "rp", "replay", reason="invalid") == 3


async def test_a_file_of_bad_lines_moves_the_offset_without_sending(tmp_path):
    path = tmp_path / "ticks.jsonl"
    path.write_text("nope\n" * 25)
    source = ReplaySource(path=path, batch_size=10)
    _, registry, sink = await replay(source)
    assert sink.records == []
    assert sample(registry, "flows_records_discarded_total", "rp", "replay", reason="invalid") == 25
    assert read_offset(source)["line"] == 25  # empty batches are acked "skipped"


# -- pacing --------------------------------------------------------------------


@pytest.mark.parametrize(("speed", "seconds"), [(1.0, 100.0), (10.0, 10.0), (None, 0.0)])
async def test_speed_paces_by_the_recorded_timestamps(tmp_path, autojump_clock, speed, seconds):
    ticks = make_ticks(303, per_ts=3)  # 101 timestamps, 1 s apart: 100 s of recording
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    start = trio.current_time()
    result, _, sink = await replay(ReplaySource(path=path, speed=speed))
    assert trio.current_time() - start == pytest.approx(seconds, abs=1e-6)
    assert result.clean and sink.records == ticks
    # paced: what is due goes at once, without waiting to fill a batch
    assert sink.batches == (101 if speed is not None else 1)


async def test_paced_batches_never_exceed_batch_size(tmp_path, autojump_clock):
    ticks = make_ticks(40, per_ts=20, step=5.0)  # two bursts of 20, 5 s apart
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    start = trio.current_time()
    _, _, sink = await replay(ReplaySource(path=path, speed=1.0, batch_size=8))
    assert trio.current_time() - start == pytest.approx(5.0)
    assert sink.records == ticks and sink.batches == 6  # 8 + 8 + 4, twice


# -- resume offsets ------------------------------------------------------------


class StallingSink(ListSink):
    """Acks the first ``k`` batches ``written``, then takes one more and hangs."""

    def __init__(self, k: int, *, name: str = "stall") -> None:
        super().__init__(name=name)
        self.k = k
        self.stalled = trio.Event()
        self.first = trio.Event()

    async def run(self, inbox):
        async for batch in inbox:
            self.first.set()
            if self.batches == self.k:
                self.stalled.set()
                await trio.sleep_forever()
            self.records.extend(batch.records)
            self.batches += 1
            inbox.metrics.end_to_end.observe(0.0)
            batch.ack("written")


@pytest.mark.parametrize("every", [0.0, 3600.0])
async def test_stopped_replay_resumes_after_the_last_acked_batch(tmp_path, autojump_clock, every):
    ticks = make_ticks(200)  # 20 batches: more than the sink and its channel (8) take
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    source = ReplaySource(path=path, batch_size=10, offset_every=every)
    sink = StallingSink(3)
    runtime = Runtime(Flow("rp", sources=[source], sinks=[sink]), registry=CollectorRegistry(),
                      metrics_addr=None, drain_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        await sink.stalled.wait()
        await trio.testing.wait_all_tasks_blocked()  # the source is blocked on a full channel
        # while running, acks move the file at most every offset_every seconds
        if every == 0:
            assert read_offset(source)["line"] == 30
        else:
            assert not source.offset_path.exists()
        runtime.stop()
    assert runtime.state == "stopped" and runtime.stop_reason == "stop"
    assert sink.records == ticks[:30]
    saved = read_offset(source)
    assert saved == {"version": 1, "path": str(path.resolve()), "line": 30,
                     "size": path.stat().st_size}

    again = ReplaySource(path=path, batch_size=10)
    result, _, rest = await replay(again)
    assert result.clean
    assert rest.records == ticks[30:]
    assert read_offset(again)["line"] == 200


async def test_acks_after_the_end_of_file_save_the_final_offset(tmp_path, autojump_clock):
    ticks = make_ticks(100)
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    source = ReplaySource(path=path, batch_size=10, offset_every=3600.0)
    sink = GatedSink()
    flow = Flow("rp", sources=[source], sinks=[sink], edges={"gated": Edge(capacity=16)})
    runtime = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        with deadline(60, "the source to finish"):
            while runtime.slots[0].state != "finished":
                await trio.sleep(0.01)
        # The source sent every batch and returned; nothing is acked yet.
        assert read_offset(source)["line"] == 0
        sink.gate.set()
    assert sink.records == ticks
    assert read_offset(source)["line"] == 100  # written by the ack hooks during the drain


async def test_a_drain_stop_cutting_a_send_is_not_a_failed_batch(tmp_path, caplog):
    ticks = make_ticks(100)
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    source = ReplaySource(path=path, batch_size=10)
    sink = GatedSink()
    flow = Flow("rp", sources=[source], sinks=[sink], edges={"gated": Edge(capacity=2)})
    registry = CollectorRegistry()
    runtime = Runtime(flow, registry=registry, metrics_addr=None)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            await wait_until(lambda: sample(registry, "flows_records_sent_total", "rp", "replay") == 20)
            await trio.testing.wait_all_tasks_blocked()  # the third batch's send is blocked
            runtime.stop()  # cuts that send: the drain stores the two on the edge
            await trio.testing.wait_all_tasks_blocked()
            sink.gate.set()
    assert sink.records == ticks[:20]
    assert read_offset(source)["line"] == 20
    assert not [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_paced_replay_saves_the_offset_while_waiting(tmp_path, autojump_clock):
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(10, step=10.0))  # one tick every 10 s
    source = ReplaySource(path=path, speed=1.0, offset_every=1.0)
    sink = StallingSink(k=1000)  # acks everything; tells when the first batch came
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_briefly, Flow("rp", sources=[source], sinks=[sink]))
        await sink.first.wait()
        t0 = trio.current_time()  # the first tick's time: the pacing starts here
        await trio.sleep_until(t0 + 5.0)
        assert read_offset(source)["line"] == 1  # acked at once, saved a second later
        await trio.sleep_until(t0 + 15.0)
        assert read_offset(source)["line"] == 2
    assert read_offset(source)["line"] == 10
    assert trio.current_time() - t0 == pytest.approx(90.0)


class FailingSink(ListSink):
    """Acks batch number ``bad`` (0-based) ``failed``, the others ``written``."""

    def __init__(self, bad: int) -> None:
        super().__init__(name="failing")
        self.bad = bad

    async def run(self, inbox):
        async for batch in inbox:
            self.batches += 1
            inbox.metrics.end_to_end.observe(0.0)
            batch.ack("failed" if self.batches - 1 == self.bad else "written")


async def test_a_failed_batch_stops_the_offset(tmp_path, caplog):
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(50))
    source = ReplaySource(path=path, batch_size=10)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        result, _ = await run_briefly(Flow("rp", sources=[source], sinks=[FailingSink(bad=2)]))
    assert result.clean
    assert read_offset(source)["line"] == 20
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "'failed'" in warnings[0] and "line 20" in warnings[0]


def test_offset_tracker_out_of_order_and_failed_acks():
    t = OffsetTracker(5)
    a, b, c = t.add(10), t.add(20), t.add(30)
    assert (t.done, t.sent, t.outstanding) == (5, 30, 3)
    assert not t.ack(c, "written") and t.done == 5
    assert not t.ack(b, "skipped") and t.done == 5
    assert t.ack(a, "written") and t.done == 30
    assert t.outstanding == 0
    assert not t.ack(a, "written")  # a second ack changes nothing

    d, e, f, g = t.add(40), t.add(50), t.add(60), t.add(70)
    assert t.ack(d, "dropped") and t.done == 40
    assert not t.ack(e, "failed") and t.blocked and t.failed_at == 40
    assert not t.ack(g, "written") and not t.ack(f, "written")
    assert t.done == 40 and t.outstanding == 0  # nothing passes a failed batch

    t2 = OffsetTracker()
    h, i = t2.add(10), t2.add(20)
    t2.abandon(i)  # its send was cancelled: it never reached the flow
    assert t2.sent == 10 and t2.outstanding == 1
    assert not t2.ack(i, "written")
    assert t2.ack(h, "written") and t2.done == 10 and t2.outstanding == 0


@pytest.mark.parametrize(
    "content",
    [
        b"\x00garbage",
        b'{"version": 1, "path": "/elsewhere/ticks.jsonl", "line": 10, "size": 1}',
        b'{"version": 2, "path": "SELF", "line": 10, "size": 1}',
        b'{"version": 1, "path": "SELF", "line": 10, "size": 99999999}',  # file shrank
        b'{"version": 1, "path": "SELF", "line": 500, "size": 1}',  # past the end
        b'{"version": 1, "path": "SELF", "line": "ten", "size": 1}',
    ],
)
async def test_an_unusable_offset_file_is_reported_once_and_ignored(tmp_path, caplog, content):
    ticks = make_ticks(30)
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    offset = tmp_path / "ticks.jsonl.offset"
    offset.write_bytes(content.replace(b"SELF", str(path.resolve()).encode()))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, _, sink = await replay(ReplaySource(path=path, batch_size=10))
    assert sink.records == ticks
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "ignoring offset file" in warnings[0]
    assert json.loads(offset.read_bytes())["line"] == 30  # replaced by a good one


async def test_fresh_ignores_a_valid_offset(tmp_path):
    ticks = make_ticks(30)
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, ticks)
    _, _, first = await replay(ReplaySource(path=path))
    assert first.records == ticks
    _, _, resumed = await replay(ReplaySource(path=path))
    assert resumed.records == []  # all done already
    _, _, fresh = await replay(ReplaySource(path=path, fresh=True))
    assert fresh.records == ticks
    _, _, cli_fresh = await replay(ReplaySource(path=path), fresh=True)  # Runtime(fresh=True)
    assert cli_fresh.records == ticks


async def test_a_growing_file_resumes_at_its_new_lines(tmp_path):
    ticks = make_ticks(30)
    path = tmp_path / "ticks.csv"
    write_csv(path, ticks[:20])
    await replay(ReplaySource(path=path))
    write_csv(path, ticks)  # the recording went on: same first lines, more after
    _, _, sink = await replay(ReplaySource(path=path))
    assert sink.records == ticks[20:]


async def test_no_offset_file_when_disabled(tmp_path):
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(10))
    source = ReplaySource(path=path, offset_path=None)
    await replay(source)
    assert source.offset == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ticks.jsonl"]


# -- progress ------------------------------------------------------------------


def test_count_lines(tmp_path):
    path = tmp_path / "f.jsonl"
    for data, n in [(b"", 0), (b"a\n", 1), (b"a\nb", 2), (b"a\n\nb\n", 3)]:
        path.write_bytes(data)
        assert count_lines(path, chunk=2) == n


async def test_progress_log_lines_show_rate_and_eta(tmp_path, caplog):
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(30))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await replay(ReplaySource(path=path, batch_size=10, progress=False, progress_every=0))
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER and "lines/s" in r.getMessage()]
    assert len(lines) == 4  # one per batch, one at the end
    assert lines[0].startswith("replay ticks.jsonl: 10/30 lines (33.3%)")
    assert "ETA" in lines[0]
    assert "30/30 lines (100.0%)" in lines[-1] and "end of file" in lines[-1]


async def test_progress_bar_with_rich(tmp_path, capsys):
    pytest.importorskip("rich")
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(30))
    _, _, sink = await replay(ReplaySource(path=path, progress=True))
    assert len(sink.records) == 30
    assert "replay ticks.jsonl" in capsys.readouterr().err


async def test_progress_falls_back_to_log_lines_without_rich(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "rich.progress", None)  # import fails
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(30))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await replay(ReplaySource(path=path, progress=True))
    assert any("30/30 lines" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_the_docs_example_builds(tmp_path, monkeypatch):
    page = Path(__file__).resolve().parent.parent / "docs" / "sources" / "replay.md"
    example = page.read_text().split("## Example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "docs/sources/replay.md example", "exec"), namespace)
    flow = namespace["flow"]
    assert isinstance(flow, Flow) and isinstance(flow.sources[0], ReplaySource)


async def test_acks_during_the_drain_write_the_offset_rarely(tmp_path, monkeypatch):
    """Each offset write is an fsync on the event loop's thread: acks that
    arrive after the source finished must not each write one."""
    import sources.replay as replay_module

    writes: list[bytes] = []
    real_write = replay_module.write_atomic

    def counting_write(path, data):
        writes.append(data)
        real_write(path, data)

    monkeypatch.setattr(replay_module, "write_atomic", counting_write)
    path = tmp_path / "ticks.jsonl"
    write_jsonl(path, make_ticks(200))
    source = ReplaySource(path=path, batch_size=1, offset_every=3600)
    sink = GatedSink()
    flow = Flow("rp", sources=[source], sinks=[sink], edges={"gated": Edge(capacity=300)})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_briefly, flow)
        await wait_until(lambda: source._finished)  # every batch sent, none acked yet
        sink.gate.set()
    assert len(sink.records) == 200
    assert read_offset(source)["line"] == 200
    assert len(writes) <= 2  # when the source stopped, and at the last ack
