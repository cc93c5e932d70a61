"""sinks.sqlite against a real SQLite file: batching, idempotence, WAL, retries."""

from __future__ import annotations

import sqlite3

import pytest
import trio
from prometheus_client import CollectorRegistry

from flows import Flow, FlowFailed, Retry, Runtime, Supervision, Tick
from flows.testing import ListSource, assert_component_metrics, run_briefly, sample
from sinks.sqlite import SQLiteSink


def ticks(n: int, offset: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i % 7}", 10.0 + i, 1_700_000_000.0 + i, bid=9.5, volume=3.0)
            for i in range(offset, offset + n)]


def rows(path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT source, symbol, ts, price, bid, ask, volume FROM ticks ORDER BY ts").fetchall()


async def test_writes_every_tick_in_batches_and_moves_its_metrics(tmp_path):
    db = tmp_path / "t.db"
    data = ticks(2500)
    sink = SQLiteSink(db, batch_size=1000, flush_interval=60.0)
    flow = Flow("sq", sources=[ListSource([data[i:i + 100] for i in range(0, 2500, 100)])], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert rows(db) == [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in data]
    # 1000 + 1000 by size, the last 500 at the drain
    assert sample(registry, "flows_sink_batch_records_count", "sq", "sqlite") == 3
    assert sample(registry, "flows_sink_batch_records_sum", "sq", "sqlite") == 2500
    assert sample(registry, "flows_sink_write_seconds_count", "sq", "sqlite") == 3
    assert_component_metrics(registry, "sq", "sqlite", "sink")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_a_redelivered_batch_is_stored_once(tmp_path):
    db = tmp_path / "t.db"
    data = ticks(50)
    flow = Flow("dup", sources=[ListSource([data, data, data[:10]])], sinks=[SQLiteSink(db)])
    await run_briefly(flow)
    flow = Flow("dup", sources=[ListSource([data])], sinks=[SQLiteSink(db)])
    await run_briefly(flow)
    assert len(rows(db)) == 50


async def test_flushes_by_time_while_the_flow_runs(tmp_path, autojump_clock):
    db = tmp_path / "t.db"
    sink = SQLiteSink(db, batch_size=10_000, flush_interval=2.0)
    written = trio.Event()

    class SlowSource(ListSource):
        async def run(self, outbox):
            await super().run(outbox)
            await written.wait()  # stay alive: only the timer can flush

    original = sink.write

    async def write(records):
        await original(records)
        written.set()

    sink.write = write
    flow = Flow("timed", sources=[SlowSource([ticks(30)])], sinks=[sink])
    await run_briefly(flow)
    assert len(rows(db)) == 30
    assert trio.current_time() >= 2.0  # the write waited for the flush interval


async def test_a_locked_database_is_retried_not_dropped(tmp_path):
    db = tmp_path / "t.db"
    SQLiteSink(db)._connect().close()  # create the table
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    failed = trio.Event()

    class Observed(SQLiteSink):
        def is_transient(self, exc):
            failed.set()
            return super().is_transient(exc)

    sink = Observed(db, busy_timeout=0.01, retry=Retry(backoff=0.01, max_backoff=0.05))
    flow = Flow("locked", sources=[ListSource([ticks(40)])], sinks=[sink])
    async with trio.open_nursery() as nursery:
        outcome = []

        async def go():
            outcome.append(await run_briefly(flow))

        nursery.start_soon(go)
        await failed.wait()
        blocker.execute("ROLLBACK")
        blocker.close()
    (result, registry), = outcome
    assert result.clean
    assert len(rows(db)) == 40
    assert sample(registry, "flows_sink_retries_total", "locked", "sqlite") >= 1
    assert sample(registry, "flows_sink_write_errors_total", "locked", "sqlite") >= 1
    assert sample(registry, "flows_errors_total", "locked", "sqlite", error_type="OperationalError") >= 1
    assert sample(registry, "flows_records_discarded_total", "locked", "sqlite", reason="write_failed") == 0


async def test_a_permanent_error_is_counted_and_dropped(tmp_path):
    db = tmp_path / "t.db"
    bad = [Tick("t", "X", 1.0, 1.0), Tick("t", "X", float("nan"), 2.0)]
    with sqlite3.connect(db) as conn:  # a stricter table than ours: price must be positive
        conn.execute(
            "CREATE TABLE ticks (source TEXT NOT NULL, symbol TEXT NOT NULL, ts REAL NOT NULL, "
            "price REAL NOT NULL CHECK (price > 0), bid REAL, ask REAL, volume REAL, "
            "PRIMARY KEY (source, symbol, ts))"
        )
    flow = Flow("perm", sources=[ListSource([bad, ticks(5)])], sinks=[SQLiteSink(db, batch_size=2)])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert len(rows(db)) == 6  # only the NaN row is lost
    assert sample(registry, "flows_records_discarded_total", "perm", "sqlite", reason="rejected") == 1


def test_rejects_bad_configuration(tmp_path):
    with pytest.raises(ValueError, match="plain SQL identifier"):
        SQLiteSink(tmp_path / "x.db", table="ticks; DROP TABLE x")
    with pytest.raises(ValueError):
        SQLiteSink(tmp_path / "x.db", batch_size=0)


async def test_records_sqlite_cannot_take_are_rejected_alone(tmp_path):
    """Fault 3: a value past 64 bits or a symbol that is not UTF-8 is the
    record's fault: dropped alone, counted, and the flow goes on."""
    db = tmp_path / "t.db"
    good = ticks(20)
    huge = Tick("t", "HUGE", 2**70, 1.5)  # type: ignore[arg-type] - hostile input
    surrogate = Tick("t", "\ud800", 1.0, 2.5)
    flow = Flow("poison", sources=[ListSource([good[:10], [huge, surrogate], good[10:]])],
                sinks=[SQLiteSink(db, batch_size=100)])
    with trio.fail_after(10):
        result, registry = await run_briefly(flow)
    assert result.clean
    assert rows(db) == [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in good]
    assert sample(registry, "flows_records_discarded_total", "poison", "sqlite", reason="rejected") == 2
    assert sample(registry, "flows_sink_retries_total", "poison", "sqlite") == 0


async def test_a_table_of_another_shape_fails_the_sink_not_retried(tmp_path):
    """Fault 3: a configuration error (here a table without our columns) is
    not retried for ever: the sink fails and the flow stops with SQLite's message."""
    db = tmp_path / "t.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE ticks (source TEXT, symbol TEXT, ts REAL, price REAL, "
                     "PRIMARY KEY (source, symbol, ts))")
    flow = Flow("shape", sources=[ListSource([ticks(5)])], sinks=[SQLiteSink(db)],
                supervision=Supervision(max_restarts=1, backoff=0.0))
    registry = CollectorRegistry()
    with trio.fail_after(10), pytest.raises(FlowFailed, match="table ticks has no column named bid"):
        await Runtime(flow, registry=registry, metrics_addr=None).run()
    assert sample(registry, "flows_sink_retries_total", "shape", "sqlite") == 0
    assert sample(registry, "flows_records_discarded_total", "shape", "sqlite", reason="write_failed") == 5
    assert sample(registry, "flows_records_discarded_total", "shape", "sqlite", reason="rejected") == 0


async def test_a_database_in_a_missing_folder_fails_naming_the_path(tmp_path):
    """SQLite says only "unable to open database file": the flow's error names the file."""
    db = tmp_path / "no" / "such" / "dir" / "t.db"
    flow = Flow("nodir", sources=[ListSource([ticks(3)])], sinks=[SQLiteSink(db)],
                supervision=Supervision(max_restarts=1, backoff=0.0))
    with trio.fail_after(10), pytest.raises(FlowFailed) as failed:
        await Runtime(flow, registry=CollectorRegistry(), metrics_addr=None).run()
    assert str(db) in str(failed.value) and "does not exist" in str(failed.value)
