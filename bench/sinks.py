"""Sink throughput: ticks/s into each real sink vs the database's own bulk path.

What it measures: ticks per second (wall time) stored by

- ``flows``: a ``Flow`` of a source sending pre-generated ``Batch`` es of B
  records straight into the sink (``batch_size=B``, ``flush_interval=60``),
  run by ``flows.Runtime`` (fresh registry, no metrics server) under
  ``trio.run``; timed around ``await Runtime.run()``, so the sink's
  connect, encoding, every write and the shutdown count. B is 100, 1000
  and 10000;
- ``baseline``: the same rows, in the same run, through the database's own
  bulk path, with the encoding done beforehand (only the load is timed):

  - PostgreSQL: ``psql -c "\\copy ticks_base FROM 'file.csv' CSV"`` on a CSV
    written beforehand (floats as ``repr``, so the same values), into a
    table identical to the sink's (same columns, same primary key); the
    whole psql process is timed (start, connect, COPY, commit);
  - Redis: one redis-py pipeline (``transaction=False``) of ``XADD ticks *
    t <json>`` with the entries the sink sends (``sinks.redis.encode_record``),
    executed in chunks of 10000: what ``redis-benchmark -P`` style
    pipelining does. (``redis-benchmark`` itself can pipeline XADD, but only
    of one fixed payload, not of these rows; it and ``redis-cli --pipe`` of
    the same rows are printed as references under the table, C clients);
  - InfluxDB: one ``POST /write?db=...&precision=n`` of the whole
    line-protocol body, encoded beforehand with ``InfluxSink.encode_batch``
    (in chunks of 50000 lines if the server refuses one body as too large);
  - SQLite (bonus, no external bulk tool): one ``executemany`` of a plain
    INSERT in a single transaction, on a table identical to the sink's,
    same pragmas (WAL, synchronous=NORMAL).

Every run starts on a fresh table / stream / database (dropped and created
again), and its row count is checked afterwards (``count(*)``, ``XLEN``,
``SELECT count(price)``) to equal N, so no variant wins by storing less.
Ticks come from ``SyntheticMarket(symbols=1000).tick()`` called repeatedly
(one timestamp per call), so ``(source, symbol, ts)`` is unique: N rows in,
N rows stored (InfluxDB points too, at ns precision).

Servers: PostgreSQL 15, Redis and InfluxDB 1.x started with
``flows.testing`` helpers on 127.0.0.1 in throw-away directories (fsync off
for PostgreSQL, persistence off for Redis), stopped at the end. Each figure
is the best of ``--repeat`` runs; within a round the batch sizes and the
baseline take turns. ``ratio`` is flows/baseline; ``ms/write`` is a flows
run's time divided by its number of writes (N/B). Wall time on a shared
2-core machine: expect figures to move by 20-30% between runs.

Target, reported as PASS/FAIL per database (the exit status is 0 either
way): at batch 1000 the sink reaches >= 0.5x its database's bulk path
(within 2x).

Run from the repository root (about 2 minutes with the defaults on 2 cores)::

    python bench/sinks.py [--records N] [--repeat K] [--only postgres,redis,influx,sqlite]
"""

from __future__ import annotations

import argparse
import csv
import gc
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import _common
import trio
from _common import PregenSource, cut
from prometheus_client import CollectorRegistry

from flows import Flow, Runtime

BATCH_SIZES = (100, 1000, 10000)
TARGET_BATCH = 1000
TARGET_RATIO = 0.5
SYMBOLS = 1000
FLUSH_INTERVAL = 60.0
REDIS_CHUNK = 10_000
INFLUX_CHUNK = 50_000
INFLUX_MAX_BODY = 25_000_000  # InfluxDB 1.x [http] max-body-size default
DATABASES = ("postgres", "redis", "influx", "sqlite")

PG_DDL = (
    "CREATE TABLE {} (source text NOT NULL, symbol text NOT NULL, ts double precision NOT NULL, "
    "price double precision NOT NULL, bid double precision, ask double precision, "
    "volume double precision, PRIMARY KEY (source, symbol, ts))"
)
SQLITE_DDL = (
    "CREATE TABLE {} (source TEXT NOT NULL, symbol TEXT NOT NULL, ts REAL NOT NULL, "
    "price REAL NOT NULL, bid REAL, ask REAL, volume REAL, PRIMARY KEY (source, symbol, ts)) "
    "WITHOUT ROWID"
)


# -- input ----------------------------------------------------------------------


def make_records(n: int) -> list[Any]:
    """``n`` ticks, whole universes of SYMBOLS at a time (the last one cut)."""
    records = _common.make_records(n, symbols=SYMBOLS)
    keys = {(r.source, r.symbol, r.ts) for r in records}
    assert len(keys) == n, "ticks are not unique by (source, symbol, ts)"
    return records


def rows_of(records: list[Any]) -> list[tuple[Any, ...]]:
    return [(t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in records]


# -- the flows side ---------------------------------------------------------------


def run_flow(sink: Any, batches: list[list[Any]]) -> float:
    """Seconds (wall) of one ``Runtime.run()`` of source -> sink."""
    flow = Flow("bench", sources=[PregenSource(batches)], sinks=[sink])
    runtime = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)

    async def main() -> float:
        t0 = time.perf_counter()
        result = await runtime.run()
        seconds = time.perf_counter() - t0
        assert result.clean, result
        return seconds

    return trio.run(main)


# -- one bench per database ---------------------------------------------------------
#
# Each has start(), flows(B) -> seconds, baseline() -> seconds, references()
# -> [(label, ticks/s)], stop(). flows() and baseline() reset the target
# first (outside the timing) and check the count after it.


class SinkBench:
    """What every database's bench has: the input, no server yet, no extra
    reference figures."""

    name = ""
    tool = ""

    def __init__(self, records: list[Any], tmp: Path) -> None:
        self.records = records
        self.n = len(records)
        self.tmp = tmp
        self.server: Any = None

    def references(self) -> list[tuple[str, float]]:
        return []


class PostgresBench(SinkBench):
    name = "postgres"
    tool = "psql \\copy"

    def __init__(self, records: list[Any], tmp: Path) -> None:
        super().__init__(records, tmp)
        self.csv_path = tmp / "ticks.csv"
        self.conn: Any = None

    def start(self) -> None:
        import psycopg

        from flows.testing.postgres import start_postgres

        with open(self.csv_path, "w", newline="") as f:
            w = csv.writer(f)
            for row in rows_of(self.records):
                w.writerow(["" if v is None else repr(v) if type(v) is float else v for v in row])
        self.server = start_postgres()
        self.conn = psycopg.connect(self.server.dsn, autocommit=True)

    def _reset(self, table: str) -> None:
        self.conn.execute(f"DROP TABLE IF EXISTS {table}")
        self.conn.execute(PG_DDL.format(table))
        self.conn.execute("CHECKPOINT")

    def _check(self, table: str) -> None:
        (count,) = self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()
        assert count == self.n, f"postgres {table}: {count} rows, expected {self.n}"
        self.conn.execute(f"DROP TABLE {table}")

    def flows(self, size: int) -> float:
        from sinks.postgres import PostgresSink

        self._reset("ticks_flows")
        sink = PostgresSink(self.server.dsn, table="ticks_flows", batch_size=size,
                            flush_interval=FLUSH_INTERVAL)
        seconds = run_flow(sink, cut(self.records, size))
        self._check("ticks_flows")
        return seconds

    def baseline(self) -> float:
        self._reset("ticks_base")
        cmd = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.server.dsn,
               "-c", f"\\copy ticks_base FROM '{self.csv_path}' CSV"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        self._check("ticks_base")
        return seconds

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.server is not None:
            self.server.close()


class RedisBench(SinkBench):
    name = "redis"
    tool = "pipelined XADD"

    def __init__(self, records: list[Any], tmp: Path) -> None:
        super().__init__(records, tmp)
        self.client: Any = None

    def start(self) -> None:
        import redis

        from flows.testing.redis import RedisServer
        from sinks.redis import FIELD, encode_record

        self.entries = [{FIELD: encode_record(r)} for r in self.records]
        self.server = RedisServer().start()
        self.client = redis.Redis.from_url(self.server.url)

    def _reset(self, stream: str) -> None:
        self.client.delete(stream)

    def _check(self, stream: str) -> None:
        count = self.client.xlen(stream)
        assert count == self.n, f"redis {stream}: XLEN {count}, expected {self.n}"
        self.client.delete(stream)

    def flows(self, size: int) -> float:
        from sinks.redis import RedisStreamSink

        self._reset("ticks_flows")
        sink = RedisStreamSink(self.server.url, stream="ticks_flows", batch_size=size,
                               flush_interval=FLUSH_INTERVAL)
        seconds = run_flow(sink, cut(self.records, size))
        self._check("ticks_flows")
        return seconds

    def baseline(self) -> float:
        self._reset("ticks_base")
        client, entries = self.client, self.entries
        t0 = time.perf_counter()
        with client.pipeline(transaction=False) as pipe:
            for i in range(0, len(entries), REDIS_CHUNK):
                for fields in entries[i : i + REDIS_CHUNK]:
                    pipe.xadd("ticks_base", fields)
                pipe.execute()
        seconds = time.perf_counter() - t0
        self._check("ticks_base")
        return seconds

    def references(self) -> list[tuple[str, float]]:
        """C clients: redis-cli --pipe of the same rows; redis-benchmark -P of one payload."""
        from sinks.redis import FIELD

        out = []
        resp = self.tmp / "xadd.resp"
        with open(resp, "wb") as f:
            head = b"*5\r\n$4\r\nXADD\r\n$10\r\nticks_pipe\r\n$1\r\n*\r\n$%d\r\n%s\r\n" % (len(FIELD), FIELD)
            for e in self.entries:
                v = e[FIELD]
                f.write(head + b"$%d\r\n%s\r\n" % (len(v), v))
        if shutil.which("redis-cli"):
            self._reset("ticks_pipe")
            with open(resp, "rb") as f:
                t0 = time.perf_counter()
                subprocess.run(["redis-cli", "-p", str(self.server.port), "--pipe"], stdin=f,
                               check=True, stdout=subprocess.DEVNULL)
                seconds = time.perf_counter() - t0
            self._check("ticks_pipe")
            out.append(("redis-cli --pipe, same rows", self.n / seconds))
        if shutil.which("redis-benchmark"):
            payload = self.entries[len(self.entries) // 2][FIELD].decode()
            self._reset("ticks_rb")
            t0 = time.perf_counter()
            subprocess.run(["redis-benchmark", "-p", str(self.server.port), "-n", str(self.n),
                            "-c", "1", "-P", str(REDIS_CHUNK // 10), "-q",
                            "XADD", "ticks_rb", "*", FIELD.decode(), payload],
                           check=True, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
            seconds = time.perf_counter() - t0
            count = self.client.xlen("ticks_rb")
            self.client.delete("ticks_rb")
            assert count == self.n, f"redis-benchmark added {count}, expected {self.n}"
            out.append((f"redis-benchmark -P {REDIS_CHUNK // 10} XADD, one payload", self.n / seconds))
        return out

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()


class InfluxBench(SinkBench):
    name = "influx"
    tool = "one /write"

    def __init__(self, records: list[Any], tmp: Path) -> None:
        super().__init__(records, tmp)
        self.run_no = 0

    def start(self) -> None:
        import httpx

        from flows.testing.influx import InfluxServer
        from sinks.influx import InfluxSink

        encoder = InfluxSink("http://127.0.0.1:1", database="x")  # only its encoder
        body = encoder.encode_batch(self.records)
        if len(body) <= INFLUX_MAX_BODY:
            self.chunks = [body]
        else:  # the server refuses bodies past max-body-size (413)
            lines = body.split(b"\n")
            self.chunks = [b"\n".join(lines[i : i + INFLUX_CHUNK])
                           for i in range(0, len(lines), INFLUX_CHUNK)]
            self.tool = f"/write x{len(self.chunks)}"
        self.server = InfluxServer().start()
        self.http = httpx.Client(base_url=self.server.url, timeout=120.0)

    def _reset(self) -> str:
        from flows.testing.influx import create_database

        self.run_no += 1
        db = f"bench{self.run_no}"
        create_database(self.server.url, db)
        return db

    def _check(self, db: str) -> None:
        from flows.testing.influx import query

        body = query(self.server.url, "SELECT count(price) FROM ticks", db=db)
        series = body["results"][0].get("series") or [{"values": [[0, 0]]}]
        count = series[0]["values"][0][1]
        assert count == self.n, f"influx {db}: {count} points, expected {self.n}"
        query(self.server.url, f'DROP DATABASE "{db}"', method="POST")

    def flows(self, size: int) -> float:
        from sinks.influx import InfluxSink

        db = self._reset()
        sink = InfluxSink(self.server.url, database=db, batch_size=size,
                          flush_interval=FLUSH_INTERVAL)
        seconds = run_flow(sink, cut(self.records, size))
        self._check(db)
        return seconds

    def baseline(self) -> float:
        db = self._reset()
        params = {"db": db, "precision": "n"}
        t0 = time.perf_counter()
        for chunk in self.chunks:
            self.http.post("/write", params=params, content=chunk).raise_for_status()
        seconds = time.perf_counter() - t0
        self._check(db)
        return seconds

    def stop(self) -> None:
        if self.server is not None:
            self.http.close()
            self.server.stop()


class SQLiteBench(SinkBench):
    name = "sqlite"
    tool = "executemany"

    def __init__(self, records: list[Any], tmp: Path) -> None:
        super().__init__(records, tmp)
        self.dir = tmp / "sqlite"
        self.run_no = 0

    def start(self) -> None:
        self.dir.mkdir()
        self.rows = rows_of(self.records)

    def _path(self) -> Path:
        self.run_no += 1
        return self.dir / f"run{self.run_no}.db"

    def _check(self, path: Path) -> None:
        db = sqlite3.connect(path)
        (count,) = db.execute("SELECT count(*) FROM ticks").fetchone()
        db.close()
        assert count == self.n, f"sqlite {path}: {count} rows, expected {self.n}"
        for p in self.dir.glob(path.name + "*"):
            p.unlink()

    def flows(self, size: int) -> float:
        from sinks.sqlite import SQLiteSink

        path = self._path()
        sink = SQLiteSink(path, batch_size=size, flush_interval=FLUSH_INTERVAL)
        seconds = run_flow(sink, cut(self.records, size))
        self._check(path)
        return seconds

    def baseline(self) -> float:
        path = self._path()
        t0 = time.perf_counter()
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(SQLITE_DDL.format("ticks"))
        db.execute("BEGIN")
        db.executemany("INSERT INTO ticks VALUES (?, ?, ?, ?, ?, ?, ?)", self.rows)
        db.execute("COMMIT")
        db.close()
        seconds = time.perf_counter() - t0
        self._check(path)
        return seconds

    def stop(self) -> None:
        pass


BENCHES: dict[str, Callable[[list[Any], Path], Any]] = {
    "postgres": PostgresBench, "redis": RedisBench, "influx": InfluxBench, "sqlite": SQLiteBench,
}


# -- main ---------------------------------------------------------------------------


def measure(bench: Any, repeat: int) -> tuple[dict[int, float], float]:
    """(batch size -> least flows seconds, least baseline seconds); taking turns."""
    best: dict[int, float] = {}
    base = float("inf")
    for _ in range(repeat):
        for size in BATCH_SIZES:
            gc.collect()
            best[size] = min(best.get(size, float("inf")), bench.flows(size))
        gc.collect()
        base = min(base, bench.baseline())
    return best, base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000,
                        help="ticks in the input (default 100000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per measurement, the best kept (default 3)")
    parser.add_argument("--only", default=",".join(DATABASES),
                        help=f"comma-separated subset of {','.join(DATABASES)} (default: all)")
    args = parser.parse_args(argv)
    if args.records < 1 or args.repeat < 1:
        parser.error("--records and --repeat must be >= 1")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(DATABASES))
    if unknown or not only:
        parser.error(f"--only: unknown {unknown}; choose from {','.join(DATABASES)}")

    t_start = time.perf_counter()
    records = make_records(args.records)
    n = len(records)
    print(
        f"input: {n} ticks, {SYMBOLS} symbols, unique (source, symbol, ts); best of "
        f"{args.repeat}, wall time; python {sys.version.split()[0]}, trio {trio.__version__}"
    )

    results = []  # (name, tool, {size: seconds}, baseline seconds, references)
    tmp = Path(tempfile.mkdtemp(prefix="flows-bench-sinks-"))
    try:
        for name in DATABASES:
            if name not in only:
                continue
            bench = BENCHES[name](records, tmp)
            try:
                bench.start()
                best, base = measure(bench, args.repeat)
                refs = bench.references()
            finally:
                bench.stop()
            results.append((name, bench.tool, best, base, refs))
            print(f"  {name}: done ({time.perf_counter() - t_start:.0f}s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    header = (
        f"{'sink':<9} {'batch':>6} {'ticks/s':>11} {'baseline':<15} {'baseline ticks/s':>16} "
        f"{'ratio':>6} {'ms/write':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, tool, best, base, _ in results:
        for size in BATCH_SIZES:
            rate, base_rate = n / best[size], n / base
            per_write = best[size] / -(-n // size) * 1e3
            print(
                f"{name:<9} {size:>6} {rate:>11,.0f} {tool:<15} {base_rate:>16,.0f} "
                f"{rate / base_rate:>5.2f}x {per_write:>9.2f}"
            )
    refs = [(name, label, rate) for name, _, _, _, rs in results for label, rate in rs]
    if refs:
        print()
        for name, label, rate in refs:
            print(f"reference ({name}): {label}: {rate:,.0f} ticks/s")

    print()
    for name, tool, best, base, _ in results:
        ratio = base / best[TARGET_BATCH]
        ok = ratio >= TARGET_RATIO
        print(f"{'PASS' if ok else 'FAIL'}  {name}: batch {TARGET_BATCH} within 2x of the "
              f"bulk path ({tool}): {ratio:.2f}x")
    print(f"\n({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
