"""Soak check (issue 13): every fault at once, for a bounded time. Does a feed
ever stop without saying so?

One process runs flows' exchange emulator and one flow holding the six HTTP
sources (Binance, Coinbase, Kraken, CoinGecko, CoinCap, OKX) and three
streams (Binance bookTicker, Coinbase ticker, Kraken v2 ticker), 6 symbols
each, into a sink that notes when each symbol last produced a record, with
``flow.gaps()`` routed to a sink that keeps every ``Gap``. Everything runs
on the real clock.

For the first ``--fault-share`` of ``--seconds`` (default 60% of 300 s),
every ``--episode`` seconds each exchange draws one fault from: a 5xx burst
(80%), hangs (30%, 8 s, past the sources' 3 s read timeout), a 429 storm
(80% forced refusals, Kraken's mixing ``EGeneral:Too many requests`` and
``EService:Throttled``), bad bodies (malformed, truncated and HTML 5xx
pages), string-typed numbers and ids (REST and streams), a delisted symbol,
or nothing; stream frames are malformed or skip ids now and then (and
Binance's stream announces a server shutdown now and then); and each
episode may hit one feed with an abrupt disconnect, a close, a stall or
(Binance) a serverShutdown event. Then the faults stop (and delisted
symbols are listed again) for the rest of the run.

The sources are set for a short soak: ``stale_after`` 10 s, unknown
symbols probed again every 15 s, a breaker of 5 failures and 5 s open, a
3 s read timeout, streams replaced after 5 s of silence, CoinCap's limit as
100 per 10 s (the emulator's 600 per minute, so a 429 without Retry-After
pauses 10 s, not 60).

Printed per source: symbols that went stale past ``stale_after`` (a record
came more than ``stale_after`` after the one before, or none came before
the end) and for how long (longest, total), gaps recorded by reason,
breaker transitions, requests the emulator refused (429/418 and Kraken's
throttle answers), and records dropped by reason. Then the targets:

1. once the faults stop, every live symbol is fresh again within
   2x ``stale_after`` (its first record after the stop);
2. no symbol is stale without a gap record covering it (the stale part of
   each silence, from ``stale_after`` after the last record to the next one,
   is covered by that source's gaps naming the symbol or all symbols,
   allowing ``--slack`` seconds plus the source's poll interval ``every``:
   a failed poll's gap ends at the failure, and the next poll comes up to a
   cycle later);
3. zero requests sent while paused by Retry-After (the emulator's view: a
   request to an exchange arriving later than 50 ms after a 429/418 with
   ``Retry-After: R`` and before R has passed; each exchange has one HTTP
   source here).

Run from the repository root::

    python bench/soak.py                  # 5 minutes
    python bench/soak.py --seconds 90     # a quick look
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import attrs
import trio
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flows import CircuitBreaker, Flow, RateLimit, Runtime
from flows.testing.emulator import Emulator
from sources.binance import BinanceStream, BinanceTickers
from sources.coinbase import CoinbaseStream, CoinbaseTickers
from sources.coincap import CoinCapPrices
from sources.coingecko import CoinGeckoPrices
from sources.kraken import KrakenStream, KrakenTickers
from sources.okx import OKXTickers

SYMBOLS = 6
HTTP_EXCHANGES = ("binance", "coinbase", "kraken", "coingecko", "coincap", "okx")
FEEDS = ("binance", "coinbase", "kraken")


@attrs.define
class TracedBreaker(CircuitBreaker):
    """A CircuitBreaker that notes its transitions."""

    transitions: list[tuple[float, str, str]] = attrs.field(factory=list, init=False)

    def _set(self, state: str) -> None:
        self.transitions.append((trio.current_time(), self.state, state))
        super()._set(state)


class Tracker:
    """Sink: when each (source, symbol) last produced a record, and its silences."""

    def __init__(self, stale_after: float) -> None:
        self.name = "tracker"
        self.stale_after = stale_after
        self.last: dict[tuple[str, str], float] = {}
        self.silences: list[tuple[str, str, float, float]] = []  # source, symbol, from, to
        self.quiet_at = float("inf")
        self.recovered: dict[tuple[str, str], float] = {}

    async def run(self, inbox: Any) -> None:
        async for batch in inbox:
            now = trio.current_time()
            for r in batch.records:
                key = (r.source, r.symbol)
                before = self.last.get(key)
                if before is not None and now - before > self.stale_after:
                    self.silences.append((*key, before, now))
                self.last[key] = now
                if now >= self.quiet_at and key not in self.recovered:
                    self.recovered[key] = now - self.quiet_at
            inbox.metrics.end_to_end.observe(0.0)
            batch.ack("written")


class GapKeeper:
    """Sink: every Gap, with the trio time it arrived."""

    def __init__(self) -> None:
        self.name = "gap_keeper"
        self.gaps: list[Any] = []

    async def run(self, inbox: Any) -> None:
        async for batch in inbox:
            self.gaps.extend(batch.records)
            batch.ack("written")


def http_sources(emulator: Emulator, url: str) -> list[Any]:
    common = {"base_url": url, "read_timeout": 3.0, "connect_timeout": 2.0, "reprobe_every": 15.0}

    def breaker() -> TracedBreaker:
        return TracedBreaker(failures=5, reset_after=5.0)

    def syms(exchange: str) -> list[str]:
        return emulator.symbols(exchange)[:SYMBOLS]

    return [
        BinanceTickers(symbols=syms("binance"), per_request=3, every=1.0, circuit=breaker(),
                       **common),
        CoinbaseTickers(symbols=syms("coinbase"), every=1.0, circuit=breaker(), **common),
        KrakenTickers(symbols=syms("kraken"), per_request=SYMBOLS, every=2.0, circuit=breaker(),
                      rate_limit_pause=3.0, **common),
        CoinGeckoPrices(symbols=syms("coingecko"), every=4.0, circuit=breaker(), **common),
        CoinCapPrices(symbols=syms("coincap"), api_key="test-key", every=1.0,
                      limits=[RateLimit(100, 10.0)], circuit=breaker(), **common),
        OKXTickers(symbols=syms("okx"), every=1.0, circuit=breaker(), **common),
    ]


def stream_sources(emulator: Emulator, url: str) -> list[Any]:
    ws = url.replace("http://", "ws://")
    common = {"silence_timeout": 5.0}
    return [
        BinanceStream(symbols=emulator.symbols("binance")[:SYMBOLS], channel="bookTicker",
                      base_url=ws, **common),
        CoinbaseStream(symbols=emulator.symbols("coinbase")[:SYMBOLS], base_url=ws + "/ws-feed",
                       **common),
        KrakenStream(symbols=emulator.stream_symbols("kraken")[:SYMBOLS], base_url=ws + "/v2",
                     **common),
    ]


FAULT_KINDS: dict[str, dict[str, Any]] = {
    "5xx burst": {"error_rate": 0.8},
    "hangs": {"hang_rate": 0.3, "hang_seconds": 8.0},
    "429 storm": {"throttle_rate": 0.8,
                  "throttle_errors": ("EGeneral:Too many requests", "EService:Throttled")},
    "bad bodies": {"malformed_rate": 0.25, "truncated_rate": 0.1, "error_rate": 0.2,
                   "html_error_share": 1.0},
    "string numbers": {"string_numbers_rate": 0.5, "ws": {"string_numbers_rate": 0.5}},
    "delisted": {},
    "none": {},
}
WS_ACTIONS = ("abrupt", "close", "stall", "shutdown", None, None)


async def inject_faults(emulator: Emulator, rng: random.Random, until: float, episode: float,
                        log: Counter[str]) -> None:
    """Draw each exchange's fault every ``episode`` seconds until ``until`` (trio time)."""
    while trio.current_time() < until:
        for exchange in HTTP_EXCHANGES:
            kind = rng.choice(list(FAULT_KINDS))
            fields: dict[str, Any] = dict(FAULT_KINDS[kind])
            if kind == "delisted":
                fields["delisted"] = (rng.choice(emulator.symbols(exchange)[:SYMBOLS]),)
            ws = dict(fields.pop("ws", {}))
            ws.update(malformed_rate=0.002, gap_rate=0.002)
            if exchange == "binance":
                ws["shutdown_rate"] = 0.002  # a serverShutdown every ~20 s of frames
            emulator.set_faults(exchange=exchange, ws=ws, **fields)
            log[f"{exchange}: {kind}"] += 1
        action = rng.choice(WS_ACTIONS)
        if action is not None:
            feed = "binance" if action == "shutdown" else rng.choice(FEEDS)
            emulator.feed(feed).disconnect(action)
            log[f"{feed} stream: {action}"] += 1
        await trio.sleep(min(episode, max(until - trio.current_time(), 0.0)))
    emulator.clear_faults()


def watch_retry_after(emulator: Emulator) -> list[tuple[str, float, str]]:
    """Log every HTTP answer the emulator sends: (exchange, trio time, status,
    Retry-After or None) in ``events``; returns the list."""
    events: list[Any] = []
    original = emulator._answer

    async def answer(api, endpoint, params, request, receive, send):
        arrived = trio.current_time()
        seen: dict[str, Any] = {}

        async def spy(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                seen["retry_after"] = next(
                    (float(v) for k, v in message["headers"] if k.lower() == b"retry-after"),
                    None)
            await send(message)

        await original(api, endpoint, params, request, receive, spy)
        events.append((api.name, arrived, trio.current_time(), seen.get("status"),
                       seen.get("retry_after")))

    emulator._answer = answer  # type: ignore[method-assign]
    return events


def paused_violations(events: list[Any]) -> dict[str, int]:
    """Requests that arrived while their exchange's Retry-After pause held."""
    by_exchange: dict[str, list[Any]] = defaultdict(list)
    for event in events:
        by_exchange[event[0]].append(event)
    bad: dict[str, int] = {}
    for exchange, rows in by_exchange.items():
        pauses = [(answered, answered + ra) for _, _, answered, status, ra in rows
                  if status in (418, 429) and ra]
        bad[exchange] = sum(
            1 for _, arrived, *_ in rows
            if any(start + 0.05 < arrived < end - 0.05 for start, end in pauses))
    return bad


def covered(gaps: list[Any], source: str, symbol: str, start: float, end: float,
            wall_offset: float) -> float:
    """Seconds of [start, end] (trio time) that ``source``'s gaps naming ``symbol``
    (or all symbols) cover."""
    spans = sorted(
        (g.start - wall_offset, g.end - wall_offset) for g in gaps
        if g.source == source and (g.symbols is None or symbol in g.symbols))
    total, at = 0.0, start
    for s, e in spans:
        s, e = max(s, at), min(e, end)
        if e > s:
            total += e - s
            at = e
    return total


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    emulator = Emulator(seed=args.seed, assets=20, tick_interval=0.5, ws_rate=4.0)
    emulator.ws.shutdown_after = 30.0
    for feed in emulator.feeds.values():
        feed.shutdown_after = 30.0
    events = watch_retry_after(emulator)
    tracker, gap_keeper = Tracker(args.stale_after), GapKeeper()
    registry = CollectorRegistry()
    log_counts: Counter[str] = Counter()
    async with trio.open_nursery() as nursery:
        url = await nursery.start(emulator.serve)
        sources = http_sources(emulator, url) + stream_sources(emulator, url)
        flow = Flow("soak")
        for source in sources:
            source.stale_after = args.stale_after
        flow.source(*sources).to(tracker)
        flow.gaps().to(gap_keeper)
        rt = Runtime(flow, registry=registry, metrics_addr=None)
        wall_offset = time.time() - trio.current_time()
        started = trio.current_time()
        fault_end = started + args.seconds * args.fault_share
        tracker.quiet_at = fault_end
        await nursery.start(rt.run)
        nursery.start_soon(inject_faults, emulator, rng, fault_end, args.episode, log_counts)
        await trio.sleep_until(started + args.seconds)
        ended = trio.current_time()
        rt.stop()
        nursery.cancel_scope.cancel()
    return report(args, sources, tracker, gap_keeper, registry, emulator, events, log_counts,
                  started, fault_end, ended, wall_offset)


def report(args, sources, tracker, gap_keeper, registry, emulator, events, log_counts,
           started, fault_end, ended, wall_offset) -> int:
    stale_after = args.stale_after
    print(f"soak: {args.seconds:g} s ({args.seconds * args.fault_share:g} s of faults, then "
          f"quiet), stale_after {stale_after:g} s, seed {args.seed}, {len(sources)} sources "
          f"x {SYMBOLS} symbols")
    print("faults drawn:", ", ".join(f"{k} x{n}" for k, n in sorted(log_counts.items())))
    silences = list(tracker.silences)
    for (source, symbol), last in tracker.last.items():  # still silent at the end
        if ended - last > stale_after:
            silences.append((source, symbol, last, ended))
    for source in sources:  # never a record at all
        for symbol in source.symbols:
            if (source.name, symbol) not in tracker.last:
                silences.append((source.name, symbol, started, ended))
    refused = {ex: sum(s["refused"] for k, s in emulator.stats[ex].items() if k != "ws")
               for ex in HTTP_EXCHANGES}
    uncovered: list[tuple[str, str, float, float, float]] = []
    rows = []
    for source in sources:
        name = source.name
        mine = [s for s in silences if s[0] == name]
        stale_for = [to - since - stale_after for _, _, since, to in mine]
        slack = args.slack + getattr(source, "every", 0.0)  # the next poll comes a cycle on
        for _, symbol, since, to in mine:
            start = since + stale_after
            miss = (to - start) - covered(gap_keeper.gaps, name, symbol, start, to, wall_offset)
            if miss > slack:
                uncovered.append((name, symbol, start - started, to - started, miss))
        gaps = Counter(g.reason for g in gap_keeper.gaps if g.source == name)
        breaker = getattr(source, "circuit", None)
        transitions = Counter(f"{a}->{b}" for _, a, b in getattr(breaker, "transitions", []))
        dropped = {}
        for metric in registry.collect():
            if metric.name == "flows_records_discarded":
                for sample in metric.samples:
                    if (sample.name.endswith("_total") and sample.labels.get("stage") == name
                            and sample.value):
                        dropped[sample.labels["reason"]] = int(sample.value)
        exchange = name.removesuffix("_stream")
        rows.append((name, len({s[1] for s in mine}), max(stale_for, default=0.0),
                     sum(stale_for), dict(gaps), dict(transitions),
                     refused.get(exchange, "-") if not name.endswith("_stream") else "-",
                     dropped))
    print()
    print("| source | stale symbols | longest stale | stale total | gaps by reason | breaker "
          "transitions | refused | dropped by reason |")
    print("|---|---:|---:|---:|---|---|---:|---|")
    for name, n, longest, total, gaps, transitions, ref, dropped in rows:
        print(f"| {name} | {n} | {longest:.1f} s | {total:.1f} s | {_fmt(gaps)} | "
              f"{_fmt(transitions)} | {ref} | {_fmt(dropped)} |")
    print()
    late = []
    for source in sources:
        for symbol in source.symbols:
            key = (source.name, symbol)
            after = tracker.recovered.get(key)
            if after is None or after > 2 * stale_after:
                late.append((*key, after))
    worst = max((v for v in tracker.recovered.values()), default=float("nan"))
    ok1 = not late
    print(f"1. fresh within 2x stale_after ({2 * stale_after:g} s) of the faults stopping: "
          f"{'PASS' if ok1 else 'FAIL'} (slowest {worst:.1f} s"
          + (f"; late: {', '.join(f'{s}/{y} ({a if a is None else round(a, 1)})' for s, y, a in late[:8])}"
             if late else "") + ")")
    ok2 = not uncovered
    print(f"2. no stale symbol without a gap covering it (slack {args.slack:g} s + every): "
          f"{'PASS' if ok2 else 'FAIL'}" + "".join(
              f"\n   {s}/{y}: stale {a:.1f}-{b:.1f} s into the run, {m:.1f} s uncovered"
              for s, y, a, b, m in uncovered[:12]))
    for name in args.show_gaps:
        print(f"\n{name}: gaps (seconds into the run)")
        for g in gap_keeper.gaps:
            if g.source == name:
                print(f"  {g.start - wall_offset - started:7.1f} {g.end - wall_offset - started:7.1f}"
                      f"  {g.reason:15} {'all' if g.symbols is None else ','.join(g.symbols)}")
        print(f"{name}: silences past stale_after (last record, next record)")
        for source, symbol, since, to in silences:
            if source == name:
                print(f"  {since - started:7.1f} {to - started:7.1f}  {symbol}")
        answers = Counter((int(a - started) // 2 * 2, status) for ex, a, _, status, _ in events
                          if ex == name.removesuffix("_stream"))
        print(f"{name}: answers by 2 s slot: " + ", ".join(
            f"{t}s:{st}x{n}" for (t, st), n in sorted(answers.items(), key=str)))
    bad = paused_violations(events)
    with_header = sum(1 for e in events if e[3] in (418, 429) and e[4])
    ok3 = not any(bad.values())
    print(f"3. no request while paused by Retry-After ({with_header} refusals carried one): "
          f"{'PASS' if ok3 else 'FAIL'} ({_fmt({k: v for k, v in bad.items() if v}) or 'none'})")
    return 0


def _fmt(counts: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="how long (default %(default)s)")
    parser.add_argument("--fault-share", type=float, default=0.6,
                        help="share of the run with faults (default %(default)s)")
    parser.add_argument("--episode", type=float, default=8.0,
                        help="seconds per fault draw (default %(default)s)")
    parser.add_argument("--stale-after", type=float, default=10.0,
                        help="every source's stale_after (default %(default)s)")
    parser.add_argument("--slack", type=float, default=3.0,
                        help="uncovered seconds allowed per stale span (default %(default)s)")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--show-gaps", metavar="SOURCE", action="append", default=[],
                        help="also list that source's gaps and silences (repeatable)")
    args = parser.parse_args()
    if not 0 < args.fault_share < 1 or args.seconds <= 0:
        parser.error("need --seconds > 0 and 0 < --fault-share < 1")
    logging.basicConfig(level=logging.ERROR)
    return trio.run(soak, args)


if __name__ == "__main__":
    sys.exit(main())
