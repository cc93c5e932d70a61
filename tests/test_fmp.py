"""sources.fmp against the exchange emulator: the bulk end-of-day CSV, batched quotes,
per-symbol dividends and profiles, the plan's limit, keys, bad answers, unknown
symbols, and the staleness filter of daily syncs."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sqlite3

import pytest
import trio
from _http_sources import check_bad_bodies_are_dropped_and_polling_goes_on
from prometheus_client import CollectorRegistry

from flows import (
    CircuitBreaker,
    Flow,
    RateLimit,
    Retry,
    Runtime,
    Shard,
    record_schema,
    redact,
    shard_of,
)
from flows.testing import (
    GatedSink,
    ListSink,
    assert_component_metrics,
    run_briefly,
    sample,
    wait_until,
)
from flows.testing.emulator import Emulator, WindowLimit
from sinks.sqlite import SQLiteSink
from sources.fmp import (
    Dividend,
    FMPDividends,
    FMPEndOfDay,
    FMPProfiles,
    FMPQuotes,
    Profile,
)

DAY = dt.date(2024, 10, 22)  # a Tuesday


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=4, assets=5, tick_interval=0, stocks=400)
    em.url = await nursery.start(em.serve)
    return em


def fast(**options):
    return {"api_key": "test-key", "limits": [RateLimit(100_000, 60.0)], **options}


async def test_one_bulk_call_brings_a_whole_date(emulator, autojump_clock):
    sink = ListSink()
    source = FMPEndOfDay(date=DAY, base_url=emulator.url, once=True, **fast())
    _, registry = await run_briefly(Flow("eod", sources=[source], sinks=[sink]))
    fmp = emulator.exchanges["fmp"]
    assert len(sink.records) == 400 and emulator.stats["fmp"]["eod-bulk"]["requests"] == 1
    close_utc = dt.datetime(2024, 10, 22, 21, tzinfo=dt.UTC).timestamp()
    for t in sink.records:
        _, _, _, close, volume = fmp.bar(t.symbol, DAY)
        assert (t.price, t.volume, t.ts) == (close, volume, close_utc)
    assert_component_metrics(registry, "eod", "fmp_eod", "source")


async def test_bulk_rows_of_chosen_symbols_and_the_missing_ones(emulator, autojump_clock):
    sink = ListSink()
    wanted = ["AAPL", "MSFT", "NOSUCH"]
    source = FMPEndOfDay(date="2024-10-22", symbols=wanted, base_url=emulator.url, once=True,
                         **fast())
    _, registry = await run_briefly(Flow("eod", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == ["AAPL", "MSFT"]
    assert sample(registry, "flows_records_discarded_total", "eod", "fmp_eod", reason="missing") == 1


async def test_quotes_come_in_comma_separated_batches(emulator, autojump_clock):
    symbols = emulator.symbols("fmp")[:250] + ["NOSUCH"]
    sink = ListSink()
    source = FMPQuotes(symbols=symbols, per_request=100, base_url=emulator.url, once=True, **fast())
    _, registry = await run_briefly(Flow("q", sources=[source], sinks=[sink]))
    served = emulator.last_served("fmp")
    assert sorted(t.symbol for t in sink.records) == sorted(symbols[:250])
    assert all(t.price == float(served[t.symbol].price) for t in sink.records)
    assert emulator.stats["fmp"]["batch-quote"]["requests"] == 3
    # left out of the answer: unknown to FMP, parked as on every HTTP source
    assert sample(registry, "flows_records_discarded_total", "q", "fmp",
                  reason="unknown_symbol") == 1
    assert source.parked.keys() == {"NOSUCH"}


async def test_an_unknown_quote_symbol_is_not_asked_for_again_every_cycle(emulator, autojump_clock):
    symbols = emulator.symbols("fmp")[:3] + ["NOSUCH"]
    sink = ListSink()
    source = FMPQuotes(symbols=symbols, base_url=emulator.url, every=1.0, **fast())
    flow = Flow("q", sources=[source], sinks=[sink])
    gaps = ListSink(name="gap_list")
    flow.gaps().to(gaps)
    _, registry = await run_briefly(flow, duration=10.5)
    assert emulator.stats["fmp"]["batch-quote"]["requests"] >= 8
    # parked once, not counted missing (and asked for) on every cycle
    assert sample(registry, "flows_records_discarded_total", "q", "fmp",
                  reason="unknown_symbol") == 1
    assert not sample(registry, "flows_records_discarded_total", "q", "fmp", reason="missing")
    assert any(g.reason == "unknown_symbol" and g.symbols == ("NOSUCH",) for g in gaps.records)


async def test_dividends_are_one_record_per_ex_date_with_every_field(emulator, autojump_clock):
    fmp = emulator.exchanges["fmp"]
    payers = [s.symbol for s in fmp.stocks if s.dividend][:5]
    others = [s.symbol for s in fmp.stocks if not s.dividend][:3]
    sink = ListSink()
    source = FMPDividends(symbols=payers + others, base_url=emulator.url, once=True, **fast())
    await run_briefly(Flow("div", sources=[source], sinks=[sink]))
    assert emulator.stats["fmp"]["dividends"]["requests"] == 8
    assert {d.symbol for d in sink.records} == set(payers) and len(sink.records) == 5 * 8
    for d in sink.records:
        assert isinstance(d, Dividend) and d.source == "fmp_dividends"
        amount = fmp.by_symbol[d.symbol].dividend
        assert d.dividend == d.adj_dividend == amount
        assert d.ts % 86400 == 0 and d.ts == dt.datetime.fromisoformat(d.date + "T00:00Z").timestamp()
        assert dt.date.fromisoformat(d.payment_date) - dt.date.fromisoformat(d.date) == \
            dt.timedelta(days=14)
        assert d.record_date == d.date and d.declaration_date < d.date
        assert d.dividend_yield > 0 and d.frequency == "Quarterly"
    assert record_schema(Dividend).key == ("source", "symbol", "date")


async def test_unknown_profiles_are_parked_the_rest_stored_in_full(emulator, autojump_clock):
    symbols = emulator.symbols("fmp")[:6] + ["NOSUCH"]
    sink = ListSink()
    source = FMPProfiles(symbols=symbols, base_url=emulator.url, once=True, **fast())
    _, registry = await run_briefly(Flow("prof", sources=[source], sinks=[sink]))
    assert {p.symbol for p in sink.records} == set(symbols[:6])
    stocks = emulator.exchanges["fmp"].by_symbol
    for p in sink.records:
        stock = stocks[p.symbol]
        assert isinstance(p, Profile) and p.price > 0 and p.market_cap > 0
        assert p.company_name == stock.name and p.currency == "USD" and p.sector
        assert p.cik == f"{stock.index + 1000:010d}" and p.full_time_employees == 100 + stock.index
        assert p.is_etf is False and p.is_actively_trading is True and p.ipo_date == "1999-01-04"
        assert p.average_volume == 1_000_000 + stock.index and p.exchange == "NASDAQ"
    assert "NOSUCH" in source.parked
    assert sample(registry, "flows_records_discarded_total", "prof", "fmp_profiles",
                  reason="unknown_symbol") == 1
    assert sample(registry, "flows_source_retries_total", "prof", "fmp_profiles") == 0


async def test_the_staleness_filter_can_read_the_sinks_own_table(emulator, tmp_path,
                                                                 autojump_clock):
    db = tmp_path / "profiles.db"
    symbols = emulator.symbols("fmp")[:12]
    first = FMPProfiles(symbols=symbols[:8], base_url=emulator.url, once=True, **fast())
    await run_briefly(Flow("p1", sources=[first], sinks=[SQLiteSink(db)]))

    def stored() -> dict[str, float]:
        with sqlite3.connect(db) as conn:
            return dict(conn.execute("select symbol, max(ts) from profiles group by symbol"))

    emulator.reset_stats()
    second = FMPProfiles(symbols=symbols, base_url=emulator.url, once=True, refreshed=stored,
                         **fast())
    await run_briefly(Flow("p2", sources=[second], sinks=[SQLiteSink(db)]))
    assert emulator.stats["fmp"]["profile"]["requests"] == 4 and second.skipped == 8
    assert len(stored()) == 12
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from profiles").fetchone()[0] == 12


async def test_the_staleness_filter_skips_symbols_fetched_recently(emulator, tmp_path,
                                                                   autojump_clock, caplog):
    state = tmp_path / "state.json"
    symbols = emulator.symbols("fmp")[:30]
    # an earlier sync was killed after its first checkpoint of 10 symbols
    first = FMPDividends(symbols=symbols[:10], base_url=emulator.url, once=True, state=state,
                         checkpoint_every=10, **fast())
    await run_briefly(Flow("s1", sources=[first], sinks=[ListSink()]))
    assert set(json.loads(state.read_text())) == set(symbols[:10])
    emulator.reset_stats()
    second = FMPDividends(symbols=symbols, base_url=emulator.url, once=True, state=state,
                          checkpoint_every=10, **fast())
    with caplog.at_level(logging.INFO, logger="flows.source.fmp"):
        _, registry = await run_briefly(Flow("s2", sources=[second], sinks=[ListSink()]))
    assert emulator.stats["fmp"]["dividends"]["requests"] == 20  # only the 20 not fetched
    assert sample(registry, "flows_source_skipped_total", "s2", "fmp_dividends") == 10
    assert caplog.records[-1].getMessage().endswith("20 requests made, 10 saved by the "
                                                    "staleness filter")
    assert set(json.loads(state.read_text())) == set(symbols)
    # a symbol older than max_age is fetched again
    stale = FMPDividends(symbols=symbols, base_url=emulator.url, once=True, state=state,
                         max_age=1e-9, **fast())
    emulator.reset_stats()
    await run_briefly(Flow("s3", sources=[stale], sinks=[ListSink()]))
    assert emulator.stats["fmp"]["dividends"]["requests"] == 30


async def test_default_limit_is_the_starter_plans_with_no_429(emulator, autojump_clock):
    symbols = emulator.symbols("fmp")[:320]
    source = FMPProfiles(symbols=symbols, base_url=emulator.url, once=True, api_key="test-key")
    await run_briefly(Flow("pace", sources=[source], sinks=[ListSink()]))
    stats = emulator.stats["fmp"]["profile"]
    assert stats["requests"] == 320 and stats["refused"] == 0
    assert trio.current_time() >= 319 * 60 / 300 * 0.99


async def test_a_429_without_retry_after_pauses_a_minute(emulator, autojump_clock):
    emulator.set_rate_limit("fmp", WindowLimit(limit=5, window=60.0))
    symbols = emulator.symbols("fmp")[:8]
    sink = ListSink()
    source = FMPProfiles(symbols=symbols, base_url=emulator.url, once=True, concurrency=1,
                         retry=Retry(attempts=4, backoff=0.01), **fast())
    await run_briefly(Flow("ra", sources=[source], sinks=[sink]))
    assert {t.symbol for t in sink.records} == set(symbols)
    assert emulator.stats["fmp"]["profile"]["refused"] == 1 and trio.current_time() >= 60.0


async def test_a_wrong_key_is_permanent_and_never_logged(emulator, monkeypatch, caplog):
    monkeypatch.setenv("FMP_TEST_KEY", "secret-fmp-7")
    with pytest.raises(ValueError, match="FMP_UNSET"):
        FMPQuotes(symbols=["AAPL"], api_key_env="FMP_UNSET")
    source = FMPQuotes(symbols=["AAPL"], api_key_env="FMP_TEST_KEY", base_url=emulator.url,
                       once=True)
    with caplog.at_level(logging.WARNING):  # (httpx's INFO lines, with URLs, are the CLI's to mute)
        _, registry = await run_briefly(Flow("key", sources=[source], sinks=[ListSink()]))
    assert emulator.stats["fmp"]["batch-quote"]["status"] == {"401": 1}
    assert "$FMP_TEST_KEY" in caplog.text and "secret-fmp-7" not in caplog.text
    assert "secret-fmp-7" not in redact("GET /stable/quote?symbol=A&apikey=secret-fmp-7 failed")
    assert sample(registry, "flows_errors_total", "key", "fmp", error_type="http_permanent") == 1


async def test_malformed_and_truncated_bodies_are_dropped_and_polling_goes_on(
        emulator, autojump_clock):
    source = FMPQuotes(symbols=emulator.symbols("fmp")[:5], base_url=emulator.url, every=2.0,
                       retry=Retry(attempts=1), circuit=CircuitBreaker(failures=100), **fast())
    await check_bad_bodies_are_dropped_and_polling_goes_on(emulator, source, "fmp", "batch-quote")


async def test_a_broken_csv_is_a_malformed_body(nursery, autojump_clock):
    from _http_sources import scripted_http_server

    url = await scripted_http_server(nursery, [], b"<html>maintenance</html>", lambda head: None)
    source = FMPEndOfDay(date=DAY, base_url=url, once=True, retry=Retry(attempts=2, backoff=0.01), **fast())
    sink = ListSink()
    _, registry = await run_briefly(Flow("csv", sources=[source], sinks=[sink]))
    assert sink.records == []
    assert sample(registry, "flows_records_discarded_total", "csv", "fmp_eod",
                  reason="request_failed") == 1


async def test_the_state_file_names_only_symbols_whose_records_a_sink_stored(
        emulator, tmp_path, autojump_clock):
    """A sync killed (SIGKILL) while its sink has not stored what was
    fetched must fetch those symbols again on resume: the state file is
    the resume point, so it may only name symbols whose records were acked."""
    state = tmp_path / "state.json"
    symbols = emulator.symbols("fmp")[:40]
    source = FMPProfiles(symbols=symbols, base_url=emulator.url, once=True, state=state,
                         checkpoint_every=2, concurrency=1, **fast())
    sink = GatedSink()  # a database that does not answer: nothing is stored, nothing acked
    rt = Runtime(Flow("kill", sources=[source], sinks=[sink]), registry=CollectorRegistry(),
                 metrics_addr=None)
    noted = []

    async def kill_point() -> None:
        await wait_until(lambda: emulator.stats["fmp"]["profile"]["requests"] >= 5, 60)
        noted.append(dict(source.refreshed))  # what a checkpoint now writes, SIGKILL leaves
        sink.gate.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_point)
        result = await rt.run()
    assert result.clean and noted == [{}]  # nothing stored: nothing may be skipped on resume
    assert set(json.loads(state.read_text())) == {r.symbol for r in sink.records} == set(symbols)


@pytest.mark.parametrize("wanted", [None, 40])
async def test_shards_split_the_bulk_rows_between_them(emulator, autojump_clock, wanted):
    """``--shard k/N``: every shard downloads the date's file (one call), and
    keeps only the rows of the symbols it owns."""
    symbols = None if wanted is None else emulator.symbols("fmp")[:wanted]
    seen = []
    for k in range(2):
        sink = ListSink()
        source = FMPEndOfDay(date=DAY, symbols=symbols, base_url=emulator.url, once=True, **fast())
        await run_briefly(Flow("eod", sources=[source], sinks=[sink]), shard=Shard(k, 2))
        seen.append({t.symbol for t in sink.records})
    assert seen[0] | seen[1] == set(symbols or emulator.symbols("fmp"))
    assert not seen[0] & seen[1]
    assert all(shard_of(s, 2) == k for k, part in enumerate(seen) for s in part)
