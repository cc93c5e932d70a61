"""Every storing sink stores Trade, Candle and a user's own msgspec Struct, a table
(measurement, stream) per record type from its fields, idempotently where the
sink promises it; Ticks keep their table. Against the real databases."""

from __future__ import annotations

import itertools
import sqlite3
import uuid
from typing import Any, ClassVar

import msgspec
import pytest

from flows import Candle, Flow, Gap, Tick, Trade, record_schema
from flows.testing import ListSource, run_briefly, sample
from sinks.jsonl import JSONLSink
from sinks.sqlite import SQLiteSink


class BookTop(msgspec.Struct, frozen=True):
    """A user's record with a key of its own and a list (a JSON column)."""

    __table__: ClassVar[str] = "book_tops"
    __key__: ClassVar[tuple[str, ...]] = ("source", "symbol", "ts")

    source: str
    symbol: str
    ts: float
    bid: float
    ask: float
    levels: list[float] = []
    live: bool = True


class Note(msgspec.Struct, frozen=True):
    """A user's record without a key (appended), with SQL keywords for names."""

    source: str
    ts: float
    text: str
    end: float | None = None
    order: int = 0


TRADES = [Trade("binance", f"S{i % 3}", 100.0 + i, 0.5 + i / 8, 1.7e9 + i / 4,
                "buy" if i % 2 else "sell", str(2**70 + i)) for i in range(12)]
CANDLES = [Candle("binance", f"S{i % 3}", 1.7e9 + 60 * (i // 3), 60.0, 10.0 + i, 12.0 + i,
                  9.0 + i, 11.0 + i, None if i == 4 else 3.5 * i, i + 1,
                  None if i == 4 else 10.5 + i, 1.7e9 + 60 * (i // 3) + 1,
                  1.7e9 + 60 * (i // 3) + 59.5) for i in range(9)]
BOOKS = [BookTop("kraken", f"P{i % 2}", 1.7e9 + i, 99.0 + i, 101.0 + i, [1.0, 2.5 * i], i % 3 > 0)
         for i in range(6)]
NOTES = [Note("me", 1.7e9 + i, f'note "{i}", with a comma', None if i else 5.0, i)
         for i in range(4)]
TICKS = [Tick("binance", f"S{i % 3}", 100.0 + i, 1.7e9 + i, bid=99.0) for i in range(5)]
KEYED = {Trade: TRADES, Candle: CANDLES, BookTop: BOOKS}


def mixed() -> list[Any]:
    """Every record once, the types interleaved in one batch."""
    out: list[Any] = []
    for group in itertools.zip_longest(TRADES, CANDLES, BOOKS, NOTES, TICKS):
        out += [r for r in group if r is not None]
    return out


async def store_twice(make_sink) -> Any:
    """Every record twice in one run (a redelivered batch), then once more by
    another sink instance (a restart); the registry of the first run."""
    records = mixed()
    flow = Flow("rec", sources=[ListSource([records[:20], records, records[20:]])],
                sinks=[make_sink()])
    result, registry = await run_briefly(flow)
    assert result.clean
    await run_briefly(Flow("rec", sources=[ListSource([records])], sinks=[make_sink()]))
    return registry


def from_row(kind: type, names: list[str], row: tuple) -> Any:
    values = dict(zip(names, row))
    for c in record_schema(kind).columns:
        if c.kind == "json" and isinstance(values[c.name], str):
            values[c.name] = msgspec.json.decode(values[c.name])
    return msgspec.convert(values, kind, strict=False)


def test_record_schemas():
    trade = record_schema(Trade)
    assert (trade.table, trade.key, trade.time) == ("trades", ("source", "symbol", "trade_id"), "ts")
    candle = record_schema(Candle)
    assert (candle.table, candle.key, candle.time) == (
        "candles", ("source", "symbol", "start", "width"), "start")
    assert record_schema(Tick).table == "ticks" and record_schema(Gap).key is None
    book = record_schema(BookTop)
    assert (book.table, book.key) == ("book_tops", ("source", "symbol", "ts"))
    assert [(c.name, c.kind, c.optional) for c in book.columns][-2:] == [
        ("levels", "json", False), ("live", "bool", False)]
    note = record_schema(Note)
    assert (note.table, note.key, note.time) == ("note", None, "ts")
    assert note.rows(NOTES[:1]) == [("me", 1.7e9, 'note "0", with a comma', 5.0, 0)]

    class Bad(msgspec.Struct):
        __key__: ClassVar[tuple[str, ...]] = ("nope",)
        x: int

    with pytest.raises(ValueError, match="key"):
        record_schema(Bad)
    with pytest.raises(TypeError):
        record_schema(dict)


# -- SQLite ---------------------------------------------------------------------------


async def test_sqlite_stores_each_type_in_its_table_once(tmp_path):
    path = tmp_path / "market.db"
    registry = await store_twice(lambda: SQLiteSink(path, tables={Note: "notes"}))
    assert sample(registry, "flows_records_discarded_total", "rec", "sqlite",
                  reason="rejected") == 0
    db = sqlite3.connect(path)

    def stored(kind: type, table: str) -> list[Any]:
        cur = db.execute(f"SELECT * FROM {table} ORDER BY rowid")
        return [from_row(kind, [d[0] for d in cur.description], row) for row in cur]

    for kind, records in KEYED.items():
        assert stored(kind, record_schema(kind).table) == records  # once each
    assert stored(Note, "notes") == NOTES * 3  # no key: every delivery appended
    assert db.execute("SELECT source, symbol, ts, price, bid, ask, volume FROM ticks "
                      "ORDER BY ts").fetchall() == [
        (t.source, t.symbol, t.ts, t.price, t.bid, t.ask, t.volume) for t in TICKS]
    assert "PRIMARY KEY (ts, source, symbol)" in db.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'ticks'").fetchone()[0]


async def test_sqlite_keeps_every_trade_without_an_id(tmp_path):
    path = tmp_path / "t.db"
    anonymous = [msgspec.structs.replace(t, trade_id=None) for t in TRADES[:3]]
    await run_briefly(Flow("a", sources=[ListSource([anonymous, anonymous])],
                           sinks=[SQLiteSink(path)]))
    assert sqlite3.connect(path).execute("SELECT count(*) FROM trades").fetchone() == (6,)


# -- JSONL --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [Trade, Candle, BookTop, Note])
async def test_jsonl_round_trips_each_type(tmp_path, kind):
    records = {**KEYED, Note: NOTES}[kind]
    path = tmp_path / "records.jsonl"
    await run_briefly(Flow("j", sources=[ListSource([records])], sinks=[JSONLSink(path)]))
    decode = msgspec.json.Decoder(kind).decode
    assert [decode(line) for line in path.read_bytes().splitlines()] == records


# -- PostgreSQL ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg():
    from flows.testing.postgres import PG_BIN, start_postgres

    if not (PG_BIN / "postgres").exists():
        pytest.skip("PostgreSQL 15 is not installed")
    pytest.importorskip("psycopg")
    server = start_postgres()
    yield server
    server.close()


def pg_rows(pg, kind: type, table: str, order: str) -> list[Any]:
    import psycopg

    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY {order}")
        return [from_row(kind, [d.name for d in cur.description], row) for row in cur]


async def test_postgres_stores_each_type_in_its_table_once(pg):
    from sinks.postgres import PostgresSink

    schema = f"s{uuid.uuid4().hex[:8]}"
    import psycopg

    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    tables = {kind: f"{schema}.{record_schema(kind).table}" for kind in (*KEYED, Note)}
    registry = await store_twice(lambda: PostgresSink(pg.dsn, table=f"{schema}.ticks",
                                                      tables=tables))
    assert sample(registry, "flows_records_discarded_total", "rec", "postgres",
                  reason="rejected") == 0
    assert pg_rows(pg, Trade, tables[Trade], "ts") == TRADES
    assert pg_rows(pg, Candle, tables[Candle], "start, symbol") == sorted(
        CANDLES, key=lambda c: (c.start, c.symbol))
    assert pg_rows(pg, BookTop, tables[BookTop], "ts") == BOOKS
    assert sorted(pg_rows(pg, Note, tables[Note], "ts"), key=lambda n: n.ts) == sorted(
        NOTES * 3, key=lambda n: n.ts)
    assert len(pg_rows(pg, Tick, f"{schema}.ticks", "ts")) == len(TICKS)
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        keys = conn.execute(
            "SELECT conrelid::regclass::text, contype FROM pg_constraint "
            f"WHERE connamespace = '{schema}'::regnamespace ORDER BY 1").fetchall()
    assert dict(keys) == {tables[Trade]: "u", tables[Candle]: "p", tables[BookTop]: "p",
                          f"{schema}.ticks": "p"}


# -- InfluxDB -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def influx():
    from flows.testing.influx import InfluxServer, influxd_path

    if influxd_path() is None:
        pytest.skip("influxd (InfluxDB 1.x) is not installed")
    with InfluxServer() as server:
        yield server


async def test_influx_writes_each_type_to_its_measurement_once(influx):
    from flows.testing.influx import create_database, query
    from sinks.influx import InfluxSink

    db = f"rec{uuid.uuid4().hex[:6]}"
    create_database(influx.url, db)
    await store_twice(lambda: InfluxSink(influx.url, database=db, precision="us",
                                         measurements={Note: "notes"}))

    def points(measurement: str) -> list[dict]:
        body = query(influx.url, f'SELECT * FROM "{measurement}"', db=db, epoch="u")
        series = body["results"][0].get("series", [])
        return [dict(zip(s["columns"], row)) for s in series for row in s["values"]]

    trades = points("trades")
    assert len(trades) == len(TRADES)  # the trade id is a tag: no two trades are one point
    for p, t in zip(sorted(trades, key=lambda p: p["time"]), TRADES):
        assert (p["time"], p["source"], p["symbol"], p["trade_id"], p["price"], p["size"],
                p["side"]) == (round(t.ts * 1e6), t.source, t.symbol, t.trade_id, t.price,
                               t.size, t.side)
    candles = points("candles")
    assert len(candles) == len(CANDLES)
    by_key = {(p["symbol"], p["time"]): p for p in candles}
    for c in CANDLES:
        p = by_key[(c.symbol, round(c.start * 1e6))]
        assert (p["width"], p["open"], p["close"], p["volume"], p["trades"], p["last_ts"]) == (
            "60.0", c.open, c.close, c.volume, c.trades, c.last_ts)
    books = points("book_tops")
    assert [(p["symbol"], p["bid"], msgspec.json.decode(p["levels"]), p["live"]) for p in books] \
        == [(b.symbol, b.bid, b.levels, b.live) for b in BOOKS]
    assert len(points("notes")) == len(NOTES)  # same tags and times: one point each
    assert len(points("ticks")) == len(TICKS)


def test_influx_with_a_mapping_of_its_own_writes_every_record_by_it():
    from sinks.influx import InfluxSink

    sink = InfluxSink("http://127.0.0.1:1", measurement="m", tags=("symbol",),
                      fields=("price",), precision="s")
    assert sink.encode(TRADES[0]) == "m,symbol=S0 price=100.0 1700000000"


# -- Redis Streams ------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    from flows.testing.redis import RedisServer, redis_server_path

    if redis_server_path() is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    with RedisServer() as server:
        yield server


async def test_redis_appends_each_type_to_its_stream(redis_server):
    import redis

    from sinks.redis import FIELD, RedisStreamSink

    prefix = uuid.uuid4().hex[:6]
    streams = {kind: f"{prefix}-{record_schema(kind).table}" for kind in (*KEYED, Note)}
    await store_twice(lambda: RedisStreamSink(redis_server.url, stream=f"{prefix}-ticks",
                                              streams=streams))
    client = redis.Redis.from_url(redis_server.url)
    try:
        for kind, records in {**KEYED, Note: NOTES}.items():
            entries = client.xrange(streams[kind])
            stored = [msgspec.json.decode(fields[FIELD], type=kind) for _, fields in entries]
            assert sorted(stored, key=repr) == sorted(records * 3, key=repr)  # at-least-once
        assert client.xlen(f"{prefix}-ticks") == len(TICKS) * 3
        await run_briefly(Flow("r", sources=[ListSource([TRADES[:2]])],
                               sinks=[RedisStreamSink(redis_server.url)]))
        assert client.xlen("trades") == 2  # default: the type's table names the stream
    finally:
        client.close()
