"""sources.polymarket against the exchange emulator: discovery on Gamma (its
JSON-in-a-string fields), batched CLOB prices, closed and resolved markets, the
limit, bad answers, unknown markets."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
import trio
from _http_sources import run_until, scripted_http_server
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, Retry, Shard, shard_of
from flows.testing import (
    ListSink,
    ListSource,
    assert_component_metrics,
    run_briefly,
    sample,
)
from flows.testing.emulator import Emulator
from sinks.sqlite import SQLiteSink
from sources.polymarket import OutcomePrice, PolymarketPrices


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=6, assets=5, tick_interval=0, prediction_markets=24)
    em.url = await nursery.start(em.serve)
    return em


def poly(emulator, **options) -> PolymarketPrices:
    return PolymarketPrices(base_url=emulator.url, gamma_url=emulator.url, **options)


def open_markets(emulator):
    return [m for m in emulator.exchanges["polymarket"].outcomes.markets if not m.closed]


async def test_discovery_then_batched_clob_prices(emulator, autojump_clock):
    sink = ListSink()
    source = poly(emulator, every=5.0, per_request=20)
    registry = CollectorRegistry()
    await run_until(Flow("pm", sources=[source], sinks=[sink]), lambda: source.cycles >= 2, registry)
    markets = open_markets(emulator)
    tokens = {t for m in markets for t in m.tokens}
    first, second = sink.records[: 2 * len(markets)], sink.records[2 * len(markets):]
    assert all(isinstance(r, OutcomePrice) for r in sink.records)
    # cycle 1: Gamma's outcomePrices for every newly found market
    assert {r.symbol for r in first} == {f"{m.id}:{o}" for m in markets for o in ("Yes", "No")}
    assert {r.token_id for r in first} == tokens
    # cycle 2: the CLOB's BUY prices, 20 token ids a call
    served = emulator.last_served("polymarket")
    assert {r.token_id for r in second} == tokens
    assert all(r.probability == float(served[r.token_id].price) for r in second)
    assert all(0 < r.probability < 1 and not r.closed for r in sink.records)
    stats = emulator.stats
    assert stats["polymarket_gamma"]["markets"]["requests"] == 2  # 200 markets: two pages
    assert stats["polymarket"]["prices"]["requests"] == -(-len(tokens) // 20)
    assert_component_metrics(registry, "pm", "polymarket", "source")


async def test_chosen_markets_closed_ones_resolve_once(emulator, autojump_clock):
    outcomes = emulator.exchanges["polymarket"].outcomes
    closed = next(m for m in outcomes.markets if m.closed)
    live = open_markets(emulator)[:2]
    sink = ListSink()
    source = poly(emulator, markets=[closed.id, live[0].slug, live[1].id], every=5.0,
                  discover_every=20.0)
    registry = CollectorRegistry()

    def resolved_later() -> bool:
        if source.cycles == 2 and live[1].id not in source.closed:
            outcomes.resolve(live[1].id, winner=1)  # it closes between two discoveries
        return source.cycles >= 6

    await run_until(Flow("pm", sources=[source], sinks=[sink]), resolved_later, registry)
    finals = [r for r in sink.records if r.closed]
    assert sorted((r.symbol, r.probability) for r in finals) == sorted([
        (f"{closed.id}:Yes", float(closed.winner == 0)), (f"{closed.id}:No", float(closed.winner == 1)),
        (f"{live[1].id}:Yes", 0.0), (f"{live[1].id}:No", 1.0)])
    assert source.closed == {closed.id, live[1].id}
    # the closed market's tokens are never priced; the other's stop once it closed
    priced = {r.token_id for r in sink.records if not r.closed}
    assert not priced & set(closed.tokens) and set(live[0].tokens) <= priced
    assert sample(registry, "flows_records_discarded_total", "pm", "polymarket",
                  reason="missing") >= 1  # the CLOB left out the newly closed market's tokens


async def test_unknown_markets_are_counted(emulator, autojump_clock):
    source = poly(emulator, markets=["999999999", "no-such-market"], once=True)
    _, registry = await run_briefly(Flow("pm", sources=[source], sinks=[ListSink()]))
    assert sample(registry, "flows_records_discarded_total", "pm", "polymarket",
                  reason="unknown_symbol") == 2


async def test_gamma_lists_arrive_as_json_strings_and_bad_ones_are_counted(nursery, autojump_clock):
    good = ('{"id": "1", "slug": "a", "closed": false, "outcomes": "[\\"Yes\\", \\"No\\"]", '
            '"outcomePrices": "[\\"0.25\\", \\"0.75\\"]", "clobTokenIds": "[\\"11\\", \\"12\\"]"}')
    uneven = ('{"id": "2", "slug": "b", "closed": false, "outcomes": "[\\"Yes\\", \\"No\\"]", '
              '"outcomePrices": "[\\"0.5\\"]", "clobTokenIds": "[\\"21\\", \\"22\\"]"}')
    broken = ('{"id": "3", "slug": "c", "closed": false, "outcomes": "[\\"Yes\\", ", '
              '"outcomePrices": "[]", "clobTokenIds": "[]"}')
    wrong = ('{"id": "4", "slug": "d", "closed": false, "outcomes": "[\\"Yes\\", \\"No\\"]", '
             '"outcomePrices": "[\\"1.5\\", \\"-0.5\\"]", "clobTokenIds": "[\\"41\\", \\"42\\"]"}')
    url = await scripted_http_server(nursery, [], f"[{good}, {uneven}, {broken}, {wrong}]".encode(),
                                     lambda head: None)
    sink = ListSink()
    source = PolymarketPrices(base_url=url, gamma_url=url, once=True, max_markets=4)
    _, registry = await run_briefly(Flow("pm", sources=[source], sinks=[sink]))
    assert [(r.symbol, r.probability, r.token_id) for r in sink.records] == [
        ("1:Yes", 0.25, "11"), ("1:No", 0.75, "12")]
    assert sample(registry, "flows_records_discarded_total", "pm", "polymarket",
                  reason="invalid") == 4  # uneven, broken, and both prices of the last


async def test_default_limit_keeps_under_gamma_and_clob_limits(emulator, autojump_clock):
    source = poly(emulator, every=0.5, side="midpoint", max_markets=100)
    await run_until(Flow("pace", sources=[source], sinks=[ListSink()]), lambda: source.cycles >= 8)
    stats = emulator.stats
    assert stats["polymarket"]["midpoint"]["requests"] >= 300  # past one window's worth
    assert stats["polymarket"]["midpoint"]["refused"] == 0
    assert stats["polymarket_gamma"]["markets"]["refused"] == 0


async def test_malformed_clob_answers_are_dropped_and_polling_goes_on(emulator, autojump_clock):
    sink = ListSink()
    source = poly(emulator, every=2.0, retry=Retry(attempts=1), circuit=CircuitBreaker(failures=100),
                  discover_every=1e9)
    registry = CollectorRegistry()
    tokens = 2 * len(open_markets(emulator))

    def faulty_after_discovery() -> bool:
        if source.cycles == 1:
            emulator.set_faults(exchange="polymarket", malformed_rate=0.4, truncated_rate=0.3)
        return source.cycles >= 12

    await run_until(Flow("mal", sources=[source], sinks=[sink]), faulty_after_discovery, registry)
    faults = emulator.stats["polymarket"]["prices"]["faults"]
    broken = faults.get("malformed", 0) + faults.get("truncated", 0)
    priced = emulator.stats["polymarket"]["prices"]["requests"]
    assert broken >= 3
    assert sample(registry, "flows_records_discarded_total", "mal", "polymarket",
                  reason="request_failed") == broken
    assert len(sink.records) == tokens + tokens * (priced - broken)  # every good answer used


async def test_discovering_all_forgets_markets_that_leave_the_listing(emulator, autojump_clock):
    outcomes = emulator.exchanges["polymarket"].outcomes
    leaving = open_markets(emulator)[0]
    source = poly(emulator, every=5.0, discover_every=20.0)
    registry = CollectorRegistry()

    def scenario() -> bool:
        if source.cycles >= 2 and not leaving.closed:
            outcomes.resolve(leaving.id)  # it closes: the active listing drops it
        return source.cycles >= 40

    await run_until(Flow("pm", sources=[source], sinks=[ListSink()]), scenario, registry)
    assert not set(leaving.tokens) & set(source.outcomes)  # forgotten
    missing = sample(registry, "flows_records_discarded_total", "pm", "polymarket", reason="missing")
    assert 0 < missing <= 2 * (2 * 20 / 5 + 2)  # counted for about two rounds, then no more


async def test_outcome_prices_are_stored_by_the_sqlite_sink_once_each(emulator, tmp_path,
                                                                       autojump_clock):
    sink = ListSink()
    await run_briefly(Flow("pm", sources=[poly(emulator, once=True)], sinks=[sink]))
    records = sink.records
    db = tmp_path / "outcomes.db"
    twice = ListSource([records, records[:5]])  # a redelivered batch
    await run_briefly(Flow("store", sources=[twice], sinks=[SQLiteSink(db)]))
    with sqlite3.connect(db) as conn:
        stored = conn.execute("select source, symbol, probability, ts, market, outcome, token_id, "
                              "closed from outcome_prices").fetchall()
    assert sorted(stored) == sorted(
        (r.source, r.symbol, r.probability, r.ts, r.market, r.outcome, r.token_id, int(r.closed))
        for r in records)


async def test_discovery_by_events_brings_each_events_markets(emulator, autojump_clock):
    sink = ListSink()
    source = poly(emulator, discover="events", max_markets=100)
    await run_until(Flow("ev", sources=[source], sinks=[sink]), lambda: source.cycles >= 1)
    markets = open_markets(emulator)
    assert {o.market_id for o in source.outcomes.values()} == {m.id for m in markets}
    assert len({m.event_id for m in markets}) < len(markets)  # some events hold several
    gamma = emulator.stats["polymarket_gamma"]
    assert gamma["events"]["requests"] == 1 and gamma["markets"]["requests"] == 0
    assert {r.symbol for r in sink.records} >= {f"{m.id}:{o}" for m in markets
                                                for o in m.outcomes}


async def test_shards_split_the_discovered_markets_between_them(emulator, autojump_clock):
    """``--shard k/N`` with discovery: each shard prices its own markets
    (by id), not every shard all of them."""
    seen = []
    for k in range(2):
        sink = ListSink()
        source = poly(emulator, every=5.0)
        await run_until(Flow("pm", sources=[source], sinks=[sink]), lambda s=source: s.cycles >= 2,
                        CollectorRegistry(), shard=Shard(k, 2))
        seen.append({r.symbol.split(":")[0] for r in sink.records})
    markets = {m.id for m in open_markets(emulator)}
    assert seen[0] | seen[1] == markets and not seen[0] & seen[1]
    assert all(shard_of(m, 2) == k for k, ids in enumerate(seen) for m in ids)


async def test_a_midpoint_without_an_order_book_parks_that_outcome_alone(emulator, autojump_clock):
    """side="midpoint" asks per token: a market that closed between two
    discoveries answers 404 (no order book) for its tokens. That outcome is
    parked with a gap of its own; the source's other outcomes are fine."""
    outcomes = emulator.exchanges["polymarket"].outcomes
    live = open_markets(emulator)[:3]
    source = poly(emulator, markets=[m.id for m in live], side="midpoint", every=1.0,
                  discover_every=300.0)
    flow = Flow("pm", sources=[source], sinks=[ListSink()])
    gaps = ListSink(name="gap_list")
    flow.gaps().to(gaps)

    def resolved_later() -> bool:
        if source.cycles == 3 and not live[0].closed:
            outcomes.resolve(live[0].id, winner=1)
        return source.cycles >= 15

    await run_until(flow, resolved_later, CollectorRegistry())
    unknown = [g for g in gaps.records if g.reason == "unknown_symbol"]
    assert unknown and all(g.symbols and g.symbols[0].startswith(live[0].id) for g in unknown)
    assert emulator.stats["polymarket"]["midpoint"]["status"].get("404", 0) <= 2  # once each


async def test_an_unknown_chosen_market_is_parked_and_asked_again_at_the_reprobe_interval(
        emulator, autojump_clock):
    """A chosen market Gamma does not know is counted unknown_symbol once, parked
    (one gap, in the parked gauge), not asked at each discovery but every
    reprobe_every; once Gamma lists it, it is unparked and priced."""
    live = open_markets(emulator)[:2]
    hidden = live[1]
    hidden.listed = False
    source = poly(emulator, markets=[live[0].id, hidden.slug, "no-such-market"], every=5.0,
                  discover_every=10.0, reprobe_every=60.0)
    sink, gaps, registry = ListSink(), ListSink(name="gap_list"), CollectorRegistry()
    flow = Flow("pm")
    flow.source(source).to(sink)
    flow.gaps().to(gaps)
    seen: dict[str, Any] = {}

    def unknown() -> float:
        return sample(registry, "flows_records_discarded_total", "pm", "polymarket",
                      reason="unknown_symbol")

    def relisted() -> bool:
        if source.cycles == 10 and "parked" not in seen:  # 50 s: five discoveries
            seen["parked"] = set(source.parked)
            seen["unknown"] = unknown()
            seen["gauge"] = sample(registry, "flows_source_parked_symbols", "pm", "polymarket")
            seen["gaps"] = [g.symbols for g in gaps.records if g.reason == "unknown_symbol"]
            hidden.listed = True
        return hidden.id in {r.symbol.split(":")[0] for r in sink.records}

    await run_until(flow, relisted, registry, timeout=200)
    assert seen["parked"] == {hidden.slug, "no-such-market"}
    assert seen["unknown"] == 2 and seen["gauge"] == 2  # once each, not at each discovery
    assert [set(g) for g in seen["gaps"]] == [{hidden.slug, "no-such-market"}]  # one gap
    assert trio.current_time() >= 60  # asked again at the next probe, not the next discovery
    assert set(source.parked) == {"no-such-market"}
    assert unknown() == 3  # the other one, probed once more
    assert {r.symbol.split(":")[0] for r in sink.records} == {live[0].id, hidden.id}
