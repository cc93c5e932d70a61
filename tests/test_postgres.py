"""sinks.postgres against a real PostgreSQL 15: COPY + upsert, idempotence, rejects, outages."""

from __future__ import annotations

import math
import random
import re
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from flows.testing.influx import free_port
from flows.testing.postgres import PG_BIN

if not (PG_BIN / "postgres").exists():
    pytest.skip(f"PostgreSQL 15 is not installed ({PG_BIN / 'postgres'} is missing)",
                allow_module_level=True)
psycopg = pytest.importorskip("psycopg", reason="psycopg 3 is not installed (extra 'postgres')")

from flows import ChangeDetector, Flow, FlowFailed, Retry, Runtime, Supervision, Tick
from flows.testing import ListSource, assert_component_metrics, run_briefly, sample
from flows.testing.postgres import PostgresServer, start_postgres
from sinks.postgres import PostgresSink
from sources.synthetic import SyntheticMarket
from tests._cli import ENV

COLUMNS = "source, symbol, ts, price, bid, ask, volume"


@pytest.fixture(scope="module")
def pg():
    server = start_postgres()
    yield server
    server.close()


@pytest.fixture
def table(pg: PostgresServer, request) -> str:
    """A table name of this test's own, absent at the start."""
    name = "t_" + re.sub(r"\W", "_", request.node.name).lower()[:50]
    query(pg, f"DROP TABLE IF EXISTS {name}")
    return name


def query(pg: PostgresServer, statement: str) -> list[tuple]:
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def ticks(n: int, offset: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i % 7}", 10.0 + i, 1_700_000_000.0 + i, bid=9.5, volume=3.0)
            for i in range(offset, offset + n)]


def as_rows(data: list[Tick]) -> list[tuple]:
    return [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in data]


class Observed(PostgresSink):
    """A PostgresSink that reports its first failure, write and write after a failure."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failed = trio.Event()
        self.wrote = trio.Event()
        self.recovered = trio.Event()
        self.errors: list[Exception] = []

    def is_transient(self, exc: Exception) -> bool:
        self.errors.append(exc)
        self.failed.set()
        return super().is_transient(exc)

    async def write(self, records):
        await super().write(records)
        self.wrote.set()
        if self.failed.is_set():
            self.recovered.set()


async def test_writes_every_tick_in_batches_and_moves_its_metrics(pg, table):
    data = ticks(2500)
    sink = PostgresSink(pg.dsn, table=table, batch_size=1000, flush_interval=60.0)
    flow = Flow("pg", sources=[ListSource([data[i:i + 100] for i in range(0, 2500, 100)])], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert query(pg, f"SELECT {COLUMNS} FROM {table} ORDER BY ts") == as_rows(data)
    # 1000 + 1000 by size, the last 500 at the drain
    assert sample(registry, "flows_sink_batch_records_count", "pg", "postgres") == 3
    assert sample(registry, "flows_sink_batch_records_sum", "pg", "postgres") == 2500
    assert sample(registry, "flows_sink_write_seconds_count", "pg", "postgres") == 3
    assert sample(registry, "flows_sink_write_errors_total", "pg", "postgres") == 0
    assert_component_metrics(registry, "pg", "postgres", "sink")
    assert sink._conn is None  # closed at the end


async def test_a_redelivered_batch_is_stored_once(pg, table):
    data = ticks(50)
    # twice in one write, then again in a later write, then by another run
    flow = Flow("dup", sources=[ListSource([data, data, data[:10]])],
                sinks=[PostgresSink(pg.dsn, table=table, batch_size=100)])
    result, registry = await run_briefly(flow)
    assert result.clean
    flow = Flow("dup", sources=[ListSource([data])], sinks=[PostgresSink(pg.dsn, table=table)])
    await run_briefly(flow)
    assert query(pg, f"SELECT {COLUMNS} FROM {table} ORDER BY ts") == as_rows(data)
    assert sample(registry, "flows_records_received_total", "dup", "postgres") == 110
    assert sample(registry, "flows_records_discarded_total", "dup", "postgres", reason="rejected") == 0


async def test_a_schema_qualified_table_is_created(pg):
    query(pg, "DROP SCHEMA IF EXISTS market CASCADE; CREATE SCHEMA market")
    flow = Flow("schema", sources=[ListSource([ticks(3)])],
                sinks=[PostgresSink(pg.dsn, table="market.quotes")])
    await run_briefly(flow)
    assert query(pg, "SELECT count(*) FROM market.quotes") == [(3,)]


async def test_a_rejected_record_is_dropped_alone(pg, table):
    # A stricter table than ours. NaN passes "price > 0" in PostgreSQL (NaN
    # sorts above every number), so it is excluded explicitly.
    query(pg, f"CREATE TABLE {table} (source text NOT NULL, symbol text NOT NULL, "
              "ts double precision NOT NULL, price double precision NOT NULL "
              "CHECK (price > 0 AND price <> 'NaN'), bid double precision, ask double precision, "
              "volume double precision, PRIMARY KEY (source, symbol, ts))")
    good = ticks(20)
    bad = [Tick("t", "X", -1.0, 1.0), Tick("t", "X", math.nan, 2.0)]
    batches = [good[:7], bad[:1], good[7:15], bad[1:], good[15:]]
    sink = PostgresSink(pg.dsn, table=table, batch_size=1000, flush_interval=60.0)
    flow = Flow("rej", sources=[ListSource(batches)], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert query(pg, f"SELECT {COLUMNS} FROM {table} ORDER BY ts") == as_rows(good)
    assert sample(registry, "flows_records_discarded_total", "rej", "postgres", reason="rejected") == 2
    assert sample(registry, "flows_records_discarded_total", "rej", "postgres", reason="write_failed") == 0
    assert sample(registry, "flows_errors_total", "rej", "postgres", error_type="CheckViolation") >= 2
    assert sample(registry, "flows_sink_retries_total", "rej", "postgres") == 0
    assert_component_metrics(registry, "rej", "postgres", "sink")


async def test_an_outage_blocks_the_flow_and_loses_nothing(pg, table):
    sink = Observed(pg.dsn, table=table, flush_interval=0.05,
                    retry=Retry(backoff=0.05, max_backoff=0.5))
    flow = Flow("outage", sources=[SyntheticMarket(symbols=100, interval=0.02)],
                stages=[ChangeDetector()], sinks=[sink])
    registry = CollectorRegistry()
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await sink.wrote.wait()  # connected and writing
            await trio.to_thread.run_sync(pg.stop)  # SIGINT: backends terminated
            await sink.failed.wait()
            emitted_while_down = sample(registry, "flows_records_sent_total", "outage", "change")
            await trio.sleep(0.3)  # stay down a while: the flow backs up, the sink retries
            await trio.to_thread.run_sync(pg.start)
            await sink.recovered.wait()
            await trio.sleep(0.2)  # more writes on the new connection
            rt.stop()
    assert rt.stop_reason == "stop"
    emitted = sample(registry, "flows_records_sent_total", "outage", "change")
    assert emitted > emitted_while_down > 0
    (count, distinct), = query(
        pg, f"SELECT count(*), count(DISTINCT (source, symbol, ts)) FROM {table}")
    assert count == emitted
    assert distinct == count
    assert sample(registry, "flows_sink_retries_total", "outage", "postgres") >= 1
    assert sample(registry, "flows_sink_write_errors_total", "outage", "postgres") >= 1
    assert sample(registry, "flows_errors_total", "outage", "postgres", error_type="OperationalError") >= 1
    assert sample(registry, "flows_records_discarded_total", "outage", "postgres", reason="rejected") == 0
    assert sample(registry, "flows_records_discarded_total", "outage", "postgres", reason="write_failed") == 0
    assert all(isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)) for e in sink.errors)
    assert_component_metrics(registry, "outage", "postgres", "sink")


async def test_a_flow_started_while_the_database_is_down_waits_for_it(pg, table):
    await trio.to_thread.run_sync(pg.stop)
    try:
        sink = Observed(pg.dsn, table=table, retry=Retry(backoff=0.05, max_backoff=0.2))
        flow = Flow("late", sources=[ListSource([ticks(30)])], sinks=[sink])
        outcome = []
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:

                async def go():
                    outcome.append(await run_briefly(flow))

                nursery.start_soon(go)
                await sink.failed.wait()  # connection refused, retrying
                assert not outcome  # the flow waits: nothing dropped
                await trio.to_thread.run_sync(pg.start)
    finally:
        await trio.to_thread.run_sync(pg.start)  # for the tests after this one
    (result, registry), = outcome
    assert result.clean
    assert query(pg, f"SELECT count(*) FROM {table}") == [(30,)]
    assert sample(registry, "flows_sink_retries_total", "late", "postgres") >= 1
    assert sample(registry, "flows_records_discarded_total", "late", "postgres", reason="write_failed") == 0


def test_rejects_bad_configuration():
    with pytest.raises(ValueError, match="plain SQL identifier"):
        PostgresSink("postgresql://x", table="ticks; DROP TABLE x")
    with pytest.raises(ValueError, match="plain SQL identifier"):
        PostgresSink("postgresql://x", table="a.b.c")
    with pytest.raises(ValueError):
        PostgresSink("postgresql://x", batch_size=0)
    with pytest.raises(ValueError):
        PostgresSink("postgresql://x", connect_timeout=0)


def test_the_server_helper_restarts_on_the_same_port_and_data(pg, tmp_path):
    query(pg, "CREATE TABLE IF NOT EXISTS helper_check (x int); INSERT INTO helper_check VALUES (1)")
    port = pg.port
    pg.stop()
    assert not pg.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.dsn, connect_timeout=2).close()
    pg.start()
    assert pg.port == port and pg.dsn == f"postgresql://postgres@127.0.0.1:{port}/postgres"
    assert query(pg, "SELECT count(*) FROM helper_check") == [(1,)]
    assert Path(pg.data_dir).is_dir()


def test_the_server_helper_starts_on_another_port_if_its_own_was_taken(monkeypatch):
    """free_port() then the server's bind (after an initdb of seconds):
    another process may bind the port in between."""
    import socket

    import flows.testing.postgres as helper

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        server = PostgresServer()
        server.port = busy  # taken during initdb
        monkeypatch.setattr(helper, "free_port", lambda: busy)  # and taken again right after
        try:
            server.start()
            assert server.port != busy
            assert query(server, "SELECT 1") == [(1,)]
        finally:
            server.close()


# -- issue 17: hung databases, poison records, credentials, readiness -----------

HUNG_FLOW = """
from flows import Flow
from sinks.postgres import PostgresSink
from sources.synthetic import SyntheticMarket

flow = Flow("hung", sources=[SyntheticMarket(symbols=200, interval=0.01)],
            sinks=[PostgresSink({dsn!r}, table={table!r}, batch_size=200, flush_interval=0.05)])
"""


def poll(condition, timeout: float, what: str) -> None:
    """Check ``condition`` until true (a real server's state; not a sync point)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_forced_stop_ends_the_process_while_postgres_hangs(pg, table, tmp_path):
    """Fault 2 (and 5): with the postmaster and its backends SIGSTOPped, SIGTERM
    ends the process within the drain deadline plus 5 s, exit code 1, and the
    final line accounts for every record the source sent."""
    drain = 1.0
    target = tmp_path / "hung_flow.py"
    target.write_text(HUNG_FLOW.format(dsn=pg.dsn, table=table))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.run", str(target), "--metrics-addr", f"127.0.0.1:{port}",
         "--drain-timeout", str(drain)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )

    def stored() -> int:
        try:
            return query(pg, f"SELECT count(*) FROM {table}")[0][0]
        except psycopg.errors.UndefinedTable:
            return 0

    def sink_stuck() -> bool:
        """The sink's inbox is full: it has stopped taking batches (its write hangs)."""
        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
        buffer = next(a for a in status["actors"] if a["name"] == "postgres")["buffer"]
        return buffer["used"] == buffer["capacity"]

    try:
        poll(lambda: stored() > 0 or proc.poll() is not None, 30, "the first rows")
        assert proc.poll() is None, proc.communicate()[1]
        pg.pause()
        try:
            poll(sink_stuck, 10, "the sink to block on the hung server")
            proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            try:
                _, err = proc.communicate(timeout=drain + 5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {drain + 5:g}s after SIGTERM with PostgreSQL hung")
            took = time.monotonic() - t0
        finally:
            pg.resume()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 1, err
    assert took < drain + 5
    final = err.strip().splitlines()[-1]
    assert "stopped by force" in final, err
    m = re.search(r"synthetic: in=0 out=(\d+) dropped=0; postgres: in=(\d+) out=0 "
                  r"dropped=(\d+) written=(\d+) lost=(\d+)", final)
    assert m, final
    sent, received, dropped, written, lost = map(int, m.groups())
    assert lost > 0 and dropped == lost  # nothing rejected: every drop is the forced stop's
    assert sent == written + lost  # every record the source sent is stored or counted lost
    assert received <= sent
    # The abandoned write may still commit once the server resumes (its data
    # was in the server's socket buffer): counted lost, maybe stored; never more.
    poll(lambda: query(pg, "SELECT count(*) FROM pg_stat_activity "
                           "WHERE application_name = 'flows-postgres'")[0][0] == 0,
         10, "the abandoned connection to go")
    ((rows,),) = query(pg, f"SELECT count(*) FROM {table}")
    assert written <= rows <= written + lost


async def test_a_symbol_too_long_to_index_is_rejected_alone_and_the_flow_goes_on(pg, table):
    """Fault 3: ProgramLimitExceeded (a 5,000-character symbol: the key is too
    big for the primary key's index) is the record's fault, not a reason to
    retry the batch for ever."""
    poison = Tick("t", "".join(random.Random(17).choices(string.ascii_letters, k=5000)), 1.0, 5.0)
    good = ticks(30)
    sink = PostgresSink(pg.dsn, table=table, batch_size=1000, flush_interval=60.0)
    flow = Flow("poison", sources=[ListSource([good[:10], [poison], good[10:20], good[20:]])],
                sinks=[sink])
    with trio.fail_after(10):
        result, registry = await run_briefly(flow)
    assert result.clean
    assert query(pg, f"SELECT {COLUMNS} FROM {table} ORDER BY ts") == as_rows(good)
    assert sample(registry, "flows_records_discarded_total", "poison", "postgres", reason="rejected") == 1
    assert sample(registry, "flows_errors_total", "poison", "postgres",
                  error_type="ProgramLimitExceeded") >= 1
    assert sample(registry, "flows_sink_retries_total", "poison", "postgres") == 0


@pytest.fixture(scope="module")
def password_role(pg: PostgresServer) -> str:
    """A role that logs in with a password over TCP (scram-sha-256); its name."""
    query(pg, "DROP ROLE IF EXISTS flows_writer; "
              "CREATE ROLE flows_writer LOGIN PASSWORD 'right-password'")
    hba = pg.data_dir / "pg_hba.conf"
    hba.write_text("host all flows_writer 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    query(pg, "SELECT pg_reload_conf()")
    return "flows_writer"


@pytest.mark.parametrize("problem", ["wrong password", "no such database", "no privilege"])
async def test_a_configuration_error_fails_the_sink_with_a_clear_error(pg, table, password_role, problem):
    """Fault 3: bad credentials, a missing database or a missing privilege are
    not retried for ever: the sink fails, the supervisor restarts it within
    its budget, then the flow stops with the server's message."""
    dsn = f"postgresql://{password_role}:right-password@127.0.0.1:{pg.port}/postgres"
    expected = {
        "wrong password": 'password authentication failed for user "flows_writer"',
        "no such database": 'database "nowhere" does not exist',
        "no privilege": "permission denied for schema public",
    }[problem]
    if problem == "wrong password":
        dsn = dsn.replace("right-password", "wrong-password")
    elif problem == "no such database":
        dsn = dsn.replace("/postgres", "/nowhere")
    sink = PostgresSink(dsn, table=table, retry=Retry(backoff=0.01, max_backoff=0.05))
    flow = Flow("conf", sources=[ListSource([ticks(5), ticks(5, 5)])], sinks=[sink],
                supervision=Supervision(max_restarts=1, backoff=0.01))
    registry = CollectorRegistry()
    with trio.fail_after(10), pytest.raises(FlowFailed, match=re.escape(expected)) as failed:
        await Runtime(flow, registry=registry, metrics_addr=None).run()
    assert "sink 'postgres' failed 2 times" in str(failed.value)
    assert sample(registry, "flows_sink_retries_total", "conf", "postgres") == 0
    assert sample(registry, "flows_records_discarded_total", "conf", "postgres", reason="rejected") == 0
    assert sample(registry, "flows_records_discarded_total", "conf", "postgres", reason="write_failed") == 10


async def test_a_hung_server_makes_the_flow_not_ready_until_it_answers_again(pg, table):
    """Fault 4: /readyz (Runtime.ready) is false with the sink's reason while
    its write hangs on a SIGSTOPped server, and true again once it resumes."""
    sink = Observed(pg.dsn, table=table, flush_interval=0.05, unready_after=0.5)
    flow = Flow("readyz", sources=[SyntheticMarket(symbols=50, interval=0.02)], sinks=[sink])
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await sink.wrote.wait()
            assert rt.ready() == (True, [])
            await trio.to_thread.run_sync(pg.pause)
            try:
                while rt.ready()[0]:
                    await trio.sleep(0.05)
                _, reasons = rt.ready()
                assert reasons[0].startswith("sink postgres: a write of ")
                assert "has been in progress for" in reasons[0]
            finally:
                await trio.to_thread.run_sync(pg.resume)
            while not rt.ready()[0]:
                await trio.sleep(0.05)
            rt.stop()
    assert rt.stop_reason == "stop"
