"""The five systems of examples/systems/, each run briefly against the emulator,
checking what it stored."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import sqlite3
from pathlib import Path

import psycopg
import pytest
import trio
from prometheus_client import CollectorRegistry

from flows import Runtime
from flows.testing import run_briefly, sample
from flows.testing.emulator import Emulator

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "systems"


def example(name: str, monkeypatch):
    """The example module (its module-level flow pointed at a closed port)."""
    monkeypatch.setenv("FLOWS_EXCHANGE_URL", "http://127.0.0.1:9")
    spec = importlib.util.spec_from_file_location(f"systems_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_until(flow, done, registry=None, timeout: float = 600.0) -> Runtime:
    rt = Runtime(flow, registry=registry or CollectorRegistry(), metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(timeout):
            while not done(rt):
                await trio.sleep(0.25)
        rt.stop()
    return rt


def rows(path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(query).fetchall()


async def test_screener_keeps_writing_from_binance_when_coincap_fails(
        monkeypatch, tmp_path, nursery):
    module = example("screener", monkeypatch)
    emulator = Emulator(seed=7, assets=12, tick_interval=0.05, unchanged=0.2, volatility=0.003)
    url = await nursery.start(emulator.serve)
    flow = module.build(url, tmp_path, every=0.1, stale_after=1.0)
    registry = CollectorRegistry()
    db = tmp_path / "screener.db"
    state = {}

    # Readiness is a state sampled on the real clock: on a loaded machine either
    # feed can pause past stale_after now and then, so each state is waited
    # for (a failure bound, not a pace): healthy first, then degraded.
    def scenario(rt: Runtime) -> bool:
        if "failed_at" not in state:
            sent = sample(registry, "flows_records_sent_total", "screener", "screener")
            if sent >= 60 and rt.ready() == (True, []):
                emulator.set_faults(exchange="coincap", error_rate=1.0)
                state["failed_at"], state["stored"] = trio.current_time(), len(rows(db, "select 1 from ticks"))
            return False
        state["ready"] = ready, reasons = rt.ready()
        if not ready and any(r.startswith("degraded: no data from coincap") for r in reasons):
            state["degraded"] = True
        waited = trio.current_time() - state["failed_at"]
        return (waited > 2.5 and "degraded" in state) or waited > 30

    await run_until(flow, scenario, registry, timeout=60)
    assert "degraded" in state, state["ready"]
    stored = rows(db, "select symbol, price from ticks")
    assert len(stored) > state["stored"]  # the screener went on, on Binance's prices alone
    assert {s for s, _ in stored} == set(module.ASSETS.values())


@pytest.fixture(scope="module")
def influx():
    from flows.testing.influx import InfluxServer, influxd_path

    if influxd_path() is None:
        pytest.skip("influxd (InfluxDB 1.x) is not installed: apt-get install influxdb")
    with InfluxServer() as server:
        yield server


async def test_livecoinwatch_to_influx_with_its_poll_cycle_histogram(
        monkeypatch, influx, nursery, autojump_clock):
    from flows.testing.influx import create_database, query

    module = example("livecoinwatch_influx", monkeypatch)
    emulator = Emulator(seed=8, assets=150, tick_interval=0, unchanged=0.5)
    url = await nursery.start(emulator.serve)
    create_database(influx.url, "lcw")
    flow = module.build(url, influx.url, "lcw", top=150, every=60.0, daily_credits=100_000)
    registry = CollectorRegistry()
    await run_until(flow, lambda rt: sample(registry, "flows_source_poll_cycle_seconds_count",
                                            "livecoinwatch", "livecoinwatch") >= 3, registry)
    changed = sample(registry, "flows_records_sent_total", "livecoinwatch", "change")
    polled = sample(registry, "flows_records_sent_total", "livecoinwatch", "livecoinwatch")
    with trio.fail_after(30):
        while True:
            body = query(influx.url, 'SELECT count("price") FROM "coins"', db="lcw")
            series = body["results"][0].get("series", [])
            stored = series[0]["values"][0][1] if series else 0
            if stored >= changed:
                break
            await trio.sleep(0.5)
    assert stored == changed and 150 <= changed < polled  # the unmoved prices were skipped
    assert emulator.stats["livecoinwatch"]["coins/list"]["requests"] >= 6  # 2 pages a cycle
    assert sample(registry, "flows_source_credits_spent_total", "livecoinwatch",
                  "livecoinwatch") >= 6


async def test_polymarket_bot_caches_moves_of_five_percent_and_resolutions(
        monkeypatch, tmp_path, nursery):
    module = example("polymarket_bot", monkeypatch)
    emulator = Emulator(seed=9, assets=5, tick_interval=0, prediction_markets=16)
    url = await nursery.start(emulator.serve)
    outcomes = emulator.exchanges["polymarket"].outcomes
    live = next(m for m in outcomes.markets if not m.closed)
    flow = module.build(url, tmp_path, every=0.05, markets=[m.id for m in outcomes.markets])
    registry = CollectorRegistry()
    source = flow.sources[0]

    def scenario(rt: Runtime) -> bool:
        if source.cycles >= 20 and live.id not in source.closed:
            outcomes.resolve(live.id, winner=0)
            source._discover_due = 0.0  # look again now (discovery runs every 300 s)
        return source.cycles >= 60 and live.id in source.closed

    await run_until(flow, scenario, registry)
    stored = rows(tmp_path / "predictions.db",
                  "select symbol, probability, closed from outcome_prices order by ts, symbol")
    cached = sample(registry, "flows_records_sent_total", "predictions", "change")
    finals = sum(1 for _, _, closed in stored if closed)
    assert len(stored) == cached + finals  # moves of 5%, and the resolutions around the cache
    assert cached < sample(registry, "flows_records_sent_total", "predictions", "polymarket")
    by_symbol: dict[str, list[tuple[float, int]]] = {}
    for symbol, p, closed in stored:
        by_symbol.setdefault(symbol, []).append((p, closed))
    for symbol, history in by_symbol.items():
        for (p0, _), (p1, closed) in itertools.pairwise(history):
            assert closed or abs(p1 / p0 - 1) >= 0.05, (symbol, history)
    assert by_symbol[f"{live.id}:Yes"][-1] == (1.0, 1)
    assert by_symbol[f"{live.id}:No"][-1] == (0.0, 1)


async def test_polymarket_bot_shares_a_rate_budget_where_redis_is_configured(
        monkeypatch, tmp_path, nursery):
    from flows.testing.redis import RedisServer, redis_server_path

    if redis_server_path() is None:
        pytest.skip("needs redis-server")
    module = example("polymarket_bot", monkeypatch)
    emulator = Emulator(seed=9, assets=5, tick_interval=0, prediction_markets=8)
    url = await nursery.start(emulator.serve)
    flow = module.build(url, tmp_path, every=0.05)
    source = flow.sources[0]
    registry = CollectorRegistry()
    with RedisServer() as server:
        rt = Runtime(flow, registry=registry, metrics_addr=None, rate_budget=server.url)
        async with trio.open_nursery() as inner:
            await inner.start(rt.run)
            with trio.fail_after(30):
                while source.cycles < 5:
                    await trio.sleep(0.05)
            assert rt.ready()[0]
            rt.stop()
    assert type(source.limiter).__name__ == "SharedRateLimiter"
    assert sample(registry, "flows_source_budget_wait_seconds_count", "predictions",
                  "polymarket") >= 5
    assert sample(registry, "flows_source_budget_fallback", "predictions", "polymarket") == 0
    assert rows(tmp_path / "predictions.db", "select count(*) from outcome_prices")[0][0] > 0


@pytest.fixture(scope="module")
def pg():
    from flows.testing.postgres import start_postgres

    server = start_postgres()
    yield server
    server.close()


def pg_count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(f"select count(*) from {table}").fetchone()[0]


async def test_fmp_daily_sync_then_a_rerun_that_the_staleness_filter_makes_free(
        monkeypatch, pg, tmp_path, nursery, autojump_clock, caplog):
    module = example("fmp_daily_sync", monkeypatch)
    emulator = Emulator(seed=10, assets=5, tick_interval=0, stocks=240)
    url = await nursery.start(emulator.serve)
    emulator.set_rate_limit("fmp", {"limit": 750})
    # universe() is a blocking call: under the autojump clock the server's virtual
    # timeouts would run out while a thread waits (test_fmp_universe_lists_every_stock)
    symbols = [stock.symbol for stock in emulator.exchanges["fmp"].stocks]
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        for table in ("eod_prices", "dividends", "profiles"):
            conn.execute(f"drop table if exists {table}")
    await run_briefly(module.build(url, pg.dsn, tmp_path, symbols=symbols, progress=False))
    payers = sum(1 for s in emulator.exchanges["fmp"].stocks if s.dividend)
    counts = {t: pg_count(pg.dsn, t) for t in ("eod_prices", "dividends", "profiles")}
    weekday = module.FMPEndOfDay(api_key="k").date.weekday() < 5
    assert counts == {"eod_prices": 240 * weekday, "dividends": 8 * payers, "profiles": 240}
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        profiles = conn.execute("select symbol, company_name, sector, market_cap, is_etf "
                                "from profiles").fetchall()
        dividends = conn.execute("select symbol, date, dividend, payment_date, frequency "
                                 "from dividends").fetchall()
    stocks = emulator.exchanges["fmp"].by_symbol
    assert all(name == stocks[s].name and sector and cap > 0 and etf is False
               for s, name, sector, cap, etf in profiles)  # the profiles in full
    assert all(amount == stocks[s].dividend and paid > date and freq == "Quarterly"
               for s, date, amount, paid, freq in dividends)
    stats = emulator.stats["fmp"]
    assert stats["dividends"]["requests"] == stats["profile"]["requests"] == 240
    assert stats["eod-bulk"]["requests"] == 1 and stats["profile"]["refused"] == 0
    emulator.reset_stats()
    with caplog.at_level(logging.INFO, logger="flows.source.fmp"):
        await run_briefly(module.build(url, pg.dsn, tmp_path, symbols=symbols, progress=False))
    assert emulator.stats["fmp"]["dividends"]["requests"] == 0
    assert emulator.stats["fmp"]["profile"]["requests"] == 0
    last = [r.getMessage() for r in caplog.records if "saved by the staleness filter" in r.getMessage()]
    assert sorted(last) == ["source fmp_dividends: 0 requests made, 240 saved by the staleness filter",
                            "source fmp_profiles: 0 requests made, 240 saved by the staleness filter"]
    assert {t: pg_count(pg.dsn, t) for t in counts} == counts  # stored once


async def test_fmp_universe_lists_every_stock(monkeypatch, nursery):
    module = example("fmp_daily_sync", monkeypatch)
    emulator = Emulator(seed=10, assets=5, tick_interval=0, stocks=240)
    url = await nursery.start(emulator.serve)
    symbols = await trio.to_thread.run_sync(module.universe, url, "test-key")
    assert symbols == [stock.symbol for stock in emulator.exchanges["fmp"].stocks]


async def test_signals_only_for_symbols_that_moved(monkeypatch, tmp_path, nursery):
    module = example("signals", monkeypatch)
    emulator = Emulator(seed=11, assets=8, tick_interval=0.05, unchanged=0.5, volatility=0.006,
                        rate_limits={"kraken": None, "coinbase": None, "okx": None})
    url = await nursery.start(emulator.serve)
    flow = module.build(url, tmp_path, every=0.1, n=3)
    registry = CollectorRegistry()
    await run_until(flow, lambda rt: sample(registry, "flows_records_sent_total", "signals",
                                            "momentum") >= 30, registry)
    polled = sum(sample(registry, "flows_records_sent_total", "signals", s)
                 for s in ("binance", "coinbase", "okx"))
    moved = sample(registry, "flows_records_sent_total", "signals", "change")
    signals = sample(registry, "flows_records_sent_total", "signals", "momentum")
    assert sample(registry, "flows_records_received_total", "signals", "momentum") == moved
    assert signals < moved < polled  # computed only for the moves, once 3 of them are known
    stored = rows(tmp_path / "signals.db", "select source, symbol, price from ticks")
    assert len(stored) == signals
    assert {s for s, _, _ in stored} <= {"momentum_binance", "momentum_coinbase", "momentum_okx"}
    assert all(0.5 < p < 2.0 and p != 1.0 for _, _, p in stored)
