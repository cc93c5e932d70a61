"""Polling under a rate limit: refresh N symbols, one request each, at R req/s.

The scenario: refresh N=1000 symbols from Binance's per-symbol endpoint
(``GET /api/v3/ticker/price?symbol=X``, request weight 2) under a limit of
R=100 requests/s, with 20 ms median latency. No client can refresh the set
faster than the bound ``N / R`` (10 s) without being refused, so every
variant's cycle time is reported against it, with the 429s it earned and
the symbols missing from its result.

The server is flows' exchange emulator, run as a separate process
(``python -m flows.testing.emulator``, on 127.0.0.1, stopped at the end) with

- Binance's weight limit set to exactly R requests of weight 2 per window:
  ``limit = 2 * R * window`` weight per ``--window`` seconds (default 1 s,
  so "R per second" holds for every second; the emulator counts fixed
  windows, at the time it answers, like Binance). Binance's 418 ban after
  repeated 429s is switched off (``ban_after`` huge) so a client that keeps
  hammering collects 429s rather than a two-minute ban that would poison the
  next variant; the emulator's limits and counters are reset between
  variants (``POST /_emulator/reset``);
- latency lognormal, median ``--latency-ms`` (20), sigma 0.5, before every
  answer (refusals included); prices step once a second.

Variants, each timed by the wall clock (it is a benchmark of waiting):

- ``flows``: ``BinanceTickers(symbols=all N, per_request=1, every=0.01,
  limits=[RateLimit(2 * R * window, window)], concurrency=--concurrency,
  read_timeout=1.0)`` in a ``Flow`` to a sink that keeps every Tick, run by
  ``flows.Runtime`` for ``--cycles`` back-to-back poll cycles. A cycle's
  time is measured around the source's ``_cycle`` (the same span
  ``flows_source_poll_cycle_seconds`` observes; the wrapper also records
  the cycle's wall-clock start and end). A Tick belongs to the cycle whose
  span holds its ``ts`` (the time its response was parsed), so "missing" is
  counted at the sink: symbols that did not reach it in that cycle.
- ``sequential httpx``: one ``httpx.AsyncClient``, one request after
  another, for one cycle (naive retry as below, never needed here).
- ``asyncio.gather``: all N requests at once, ``asyncio.gather`` over one
  ``httpx.AsyncClient`` with an unbounded pool (a connection per request),
  naive retry: on 429/418, 5xx or a transport error sleep a fixed 1 s and
  retry, at most 5 times; one cycle. (With httpx's default pool, 100
  connections and a 5 s pool timeout, this collapses at N=1000 before the
  limit matters: httpcore's pool does work per queued request on every
  event, the client saturates its core, and every request ends in
  PoolTimeout/ConnectTimeout, 0 reaching the server; measured, ~7 minutes
  for one "cycle" with its retries.)
- ``flows + faults``: the flows variant for ``--fault-cycles`` cycles with
  2% 5xx answers and 1% hangs (30 s, cut by flows' 1 s read timeout)
  injected through ``POST /_emulator/faults``; p50/p99 of the cycle times
  (with few cycles p99 is close to the worst cycle).

- ``flows x3 shared`` (and ``+ faults``, the same faults): three processes,
  ``--shard 0/3``, ``1/3``, ``2/3`` of the same N symbols, each the flows
  variant above (same limit, the whole R) on one shared rate budget
  (``rate_budget=`` a Redis started for the run, ``flows.testing.redis``).
  Each shard runs ``--shared-cycles`` cycles (and goes on polling until
  the last shard is through, so every cycle is measured under contention);
  a round's time is the slowest shard's cycle of that round: the time in
  which the whole universe was refreshed once. Against the same bound
  N / R: the three together may not go faster than one process alone.
  The notes give each shard's median cycle.

429s are the emulator's count of refused requests (429 and 418; its
``GET /_emulator/stats``), cross-checked against what the client saw
(flows: ``flows_source_responses_total{status_class="429"}``). ``cpu c/s``
is the CPU used by this process (the client) and by the emulator over the
variant's run, in % of one core: it tells a client- or server-bound run
from one that waits on the limit.

Experiments (off by default; the defaults measure flows as it is):
``--limit-share S`` gives flows a limit of S times the emulator's (head
room against the jitter of arrival times: the server counts a request when
it answers, not when the client sent it); ``--window 60`` gives the emulator
Binance's real one-minute window (12000 weight per 60 s at R=100).

Targets, reported as PASS/FAIL (the exit status is 0 either way): clean,
every flows cycle within 1.1x the bound and no 429; with faults, p99 within
1.3x the bound and no symbol missing from any cycle; three processes on a
shared budget, with and without faults: median round within 1.15x the
bound, zero 429s, no symbol missing.

Run from the repository root (about 5 minutes with the defaults; the
three-process rows need ``redis-server``, ``--skip shared`` leaves them out)::

    python bench/polling.py
    python bench/polling.py --symbols 500 --rate 50 --cycles 2 --fault-cycles 4
    python bench/polling.py --skip sequential --skip gather --limit-share 0.98
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import attrs
import httpx
import trio
from _common import start_emulator, stop_process
from prometheus_client import CollectorRegistry

from flows import Flow, Inbox, RateLimit, Runtime, Shard
from flows.testing import sample
from flows.testing.emulator import Emulator
from flows.testing.redis import RedisServer
from sources.binance import BinanceTickers

PATH = "/api/v3/ticker/price"
WEIGHT = 2  # Binance's weight of a one-symbol ticker request
NAIVE_RETRIES = 5
NAIVE_SLEEP = 1.0
SEED = 7


# -- the emulator, a separate process -------------------------------------------


class EmulatorProcess:
    """``python -m flows.testing.emulator`` on 127.0.0.1, a free port; its control API."""

    def __init__(self, args: argparse.Namespace) -> None:
        weight = round(WEIGHT * args.rate * args.window)
        self.latency = {"dist": "lognormal", "ms": args.latency_ms, "sigma": 0.5}
        self.limit_spec = f"limit={weight},window={args.window:g},ban_after=1000000000"
        self.proc, self.url = start_emulator([
            "--seed", str(SEED), "--assets", str(args.symbols),
            "--tick-interval", "1", "--rate-limit", f"binance={self.limit_spec}",
            "--latency-dist", "lognormal", "--latency-ms", str(args.latency_ms),
        ])
        self.control = httpx.Client(base_url=self.url, timeout=10.0)

    def reset(self, faults: dict[str, Any] | None = None) -> None:
        """Forget counted weight and stats; set the faults (latency always)."""
        self.control.post("/_emulator/reset").raise_for_status()
        body = {"latency": self.latency, **(faults or {})}
        self.control.post("/_emulator/faults", json=body).raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = self.control.get("/_emulator/stats")
        response.raise_for_status()
        return response.json()["binance"]["ticker/price"]

    def cpu_seconds(self) -> float:
        """The emulator process's CPU time so far (Linux; else NaN)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_process(self.proc)
        if hasattr(self, "control"):
            self.control.close()


@attrs.define
class Result:
    name: str
    cycles: list[float]  # seconds per cycle
    missing: list[int]  # symbols missing, per cycle
    refused: int  # 429/418 counted by the emulator
    seen_429: int  # 429/418 the client saw
    requests: int  # requests the emulator answered
    extra: str = ""
    client_cpu: float = math.nan  # share of one core, over the variant's run
    server_cpu: float = math.nan


# -- flows -------------------------------------------------------------------------


class TickSink:
    """Sink: keeps (symbol, ts) of every Tick."""

    def __init__(self, *, name: str = "ticks") -> None:
        self.name = name
        self.seen: list[tuple[str, float]] = []

    async def run(self, inbox: Inbox) -> None:
        async for batch in inbox:
            self.seen.extend((t.symbol, t.ts) for t in batch.records)
            batch.ack("written")


def run_flows(name: str, url: str, symbols: list[str], args: argparse.Namespace,
              cycles: int, shard: Shard | None = None, budget: str | None = None,
              on_cycle: Any = None) -> tuple[list[float], list[int], int, str]:
    """(cycle seconds, missing per cycle, 429s seen, notes) of ``cycles`` flows cycles
    (of ``shard``'s symbols, on the shared rate ``budget`` when given). With
    ``on_cycle`` the source goes on polling after ``cycles`` until stopped
    (SIGTERM), calling ``on_cycle(n)`` after each of the first ``cycles``."""
    source = BinanceTickers(
        symbols=symbols, base_url=url, per_request=1, every=0.01,
        limits=[RateLimit(WEIGHT * args.rate * args.window * args.limit_share, args.window)],
        concurrency=args.concurrency, read_timeout=1.0, connect_timeout=1.0,
    )
    sink = TickSink()
    registry = CollectorRegistry()
    runtime = Runtime(Flow("poll", sources=[source], sinks=[sink]), registry=registry,
                      metrics_addr=None, shard=shard, rate_budget=budget,
                      handle_signals=on_cycle is not None)
    spans: list[tuple[float, float, float]] = []  # (wall start, wall end, seconds)
    original = source._cycle

    async def main() -> None:
        done = trio.Event()

        async def timed_cycle(*a: Any, **kw: Any) -> None:
            wall, t0 = time.time(), time.perf_counter()
            await original(*a, **kw)
            if len(spans) >= cycles:
                return  # a shard that goes on polling, so the others stay under contention
            spans.append((wall, time.time(), time.perf_counter() - t0))
            if on_cycle is not None:
                on_cycle(len(spans))
                return
            print(f"  {name}: cycle {len(spans)}/{cycles} {spans[-1][2]:.2f}s", file=sys.stderr)
            if len(spans) >= cycles:
                done.set()
                await trio.sleep_forever()  # no more requests until stopped

        source._cycle = timed_cycle  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.run)
            if on_cycle is not None:
                return  # runs until SIGTERM
            await done.wait()
            runtime.stop()

    trio.run(main)
    starts = [s for s, _, _ in spans]
    got: list[set[str]] = [set() for _ in spans]
    for symbol, ts in sink.seen:
        k = bisect.bisect_right(starts, ts) - 1
        if k >= 0 and ts <= spans[k][1]:
            got[k].add(symbol)
    missing = [len(set(source.symbols) - g) for g in got]  # the shard's symbols
    seen_429 = int(sample(registry, "flows_source_responses_total", "poll", source.name,
                          status_class="429"))
    retries = int(sample(registry, "flows_source_retries_total", "poll", source.name))
    failed = int(sample(registry, "flows_records_discarded_total", "poll", source.name,
                        reason="request_failed"))
    errors = int(sample(registry, "flows_source_responses_total", "poll", source.name,
                        status_class="error"))
    s5xx = int(sample(registry, "flows_source_responses_total", "poll", source.name,
                      status_class="5xx"))
    notes = f"retries={retries} 5xx={s5xx} timeouts/errors={errors} failed={failed}"
    return [s for _, _, s in spans], missing, seen_429, notes


# -- three processes on one shared budget ----------------------------------------------

SHARDS = 3


def run_child(args: argparse.Namespace) -> int:
    """``--child K``: shard K of 3 on the budget; prints ``cycle N`` lines, then
    (after SIGTERM and the drain) one JSON line with its figures."""
    symbols = Emulator(seed=SEED, assets=args.symbols).symbols("binance")

    def on_cycle(n: int) -> None:
        print(f"cycle {n}", flush=True)

    cycles, missing, seen, notes = run_flows(
        f"shard {args.child}", args.emulator, symbols, args, args.child_cycles,
        shard=Shard(args.child, SHARDS), budget=args.budget, on_cycle=on_cycle)
    print(json.dumps({"cycles": cycles, "missing": missing, "seen": seen, "notes": notes}),
          flush=True)
    return 0


def run_shards(name: str, url: str, args: argparse.Namespace, cycles: int,
               budget: str) -> tuple[list[float], list[int], int, str]:
    """Three shard processes on one budget until each did ``cycles`` cycles
    (the ones done first go on polling). A round's time is its slowest
    shard's cycle: the time in which the whole universe was refreshed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--emulator", url, "--budget", budget,
           "--child-cycles", str(cycles), "--symbols", str(args.symbols), "--rate", str(args.rate),
           "--window", str(args.window), "--concurrency", str(args.concurrency),
           "--limit-share", str(args.limit_share)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    children = [subprocess.Popen([*cmd, "--child", str(k)], stdout=subprocess.PIPE, text=True,
                                 env=env) for k in range(SHARDS)]
    try:
        for k, child in enumerate(children):
            assert child.stdout is not None
            for line in child.stdout:  # the others go on meanwhile: pipes hold their lines
                if line.strip() == f"cycle {cycles}":
                    break
            print(f"  {name}: shard {k}/{SHARDS} did {cycles} cycles", file=sys.stderr)
        for child in children:
            child.send_signal(signal.SIGTERM)
        results = []
        for child in children:
            out, _ = child.communicate(timeout=60)
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    rounds = [max(r["cycles"][i] for r in results) for i in range(cycles)]
    missing = [sum(r["missing"][i] for r in results) for i in range(cycles)]
    per_shard = " ".join(f"s{k}={percentile(r['cycles'], 0.5):.2f}s"
                         for k, r in enumerate(results))
    totals: dict[str, int] = {}
    for r in results:
        for key, value in re.findall(r"([\w/]+)=(\d+)", r["notes"]):
            totals[key] = totals.get(key, 0) + int(value)
    notes = f"p50 by shard {per_shard}; " + " ".join(f"{k}={v}" for k, v in totals.items())
    return rounds, missing, sum(r["seen"] for r in results), notes


# -- naive asyncio clients -----------------------------------------------------------


async def naive_fetch(client: httpx.AsyncClient, symbol: str, counts: dict[str, int]) -> bool:
    """One symbol: retry 429/418, 5xx and transport errors after a fixed sleep."""
    for attempt in range(NAIVE_RETRIES + 1):
        try:
            response = await client.get(PATH, params={"symbol": symbol})
        except httpx.HTTPError:
            counts["errors"] += 1
        else:
            if response.status_code == 200:
                return response.json().get("symbol") == symbol
            if response.status_code in (418, 429):
                counts["429"] += 1
            elif response.status_code < 500:
                return False  # 4xx other than 429: not worth a retry
        if attempt < NAIVE_RETRIES:
            await asyncio.sleep(NAIVE_SLEEP)
    return False


def run_sequential(url: str, symbols: list[str]) -> tuple[float, int, int, str]:
    async def main() -> tuple[float, int, int, str]:
        counts = {"429": 0, "errors": 0}
        async with httpx.AsyncClient(base_url=url) as client:
            t0 = time.perf_counter()
            ok = [await naive_fetch(client, s, counts) for s in symbols]
            seconds = time.perf_counter() - t0
        return seconds, ok.count(False), counts["429"], f"errors={counts['errors']}"

    return asyncio.run(main())


def run_gather(url: str, symbols: list[str]) -> tuple[float, int, int, str]:
    async def main() -> tuple[float, int, int, str]:
        counts = {"429": 0, "errors": 0}
        unbounded = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=url, limits=unbounded) as client:
            t0 = time.perf_counter()
            ok = await asyncio.gather(*(naive_fetch(client, s, counts) for s in symbols))
            seconds = time.perf_counter() - t0
        return seconds, ok.count(False), counts["429"], f"errors={counts['errors']}"

    return asyncio.run(main())


# -- report ------------------------------------------------------------------------------


def client_seconds() -> float:
    """CPU time of this process and of its children that ended (the shard
    processes of the three-process rows; the emulator is still running)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    at = (len(ordered) - 1) * q
    lo = int(at)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (at - lo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--symbols", type=int, default=1000, help="N symbols (default 1000)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="R: the limit in requests/s (default 100)")
    parser.add_argument("--window", type=float, default=1.0,
                        help="the emulator's fixed window in seconds (default 1; Binance: 60)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="median latency, lognormal (default 20)")
    parser.add_argument("--cycles", type=int, default=3, help="flows cycles, clean (default 3)")
    parser.add_argument("--fault-cycles", type=int, default=8,
                        help="flows cycles with faults (default 8)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="flows' requests in flight (default 16)")
    parser.add_argument("--limit-share", type=float, default=1.0,
                        help="flows' limit as a share of the emulator's (default 1.0: exactly "
                             "the limit)")
    parser.add_argument("--skip", action="append", default=[],
                        choices=("flows", "sequential", "gather", "faults", "shared"),
                        help="leave a variant out (repeatable)")
    parser.add_argument("--shared-cycles", type=int, default=3,
                        help="rounds of the three-process variant, clean (default 3)")
    parser.add_argument("--shared-fault-cycles", type=int, default=4,
                        help="rounds of the three-process variant with faults (default 4)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # shard K of 3 (internal)
    parser.add_argument("--child-cycles", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--emulator", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        logging.basicConfig(level=getattr(logging, os.environ.get("BENCH_CHILD_LOG", "ERROR")))
        return run_child(args)
    if args.symbols < 1 or args.rate <= 0 or args.cycles < 1 or args.fault_cycles < 1:
        parser.error("--symbols, --rate, --cycles and --fault-cycles must be positive")
    logging.basicConfig(level=logging.ERROR)  # flows' own warnings off the table

    t_start = time.perf_counter()
    bound = args.symbols / args.rate
    emulator = EmulatorProcess(args)
    try:
        symbols = Emulator(seed=SEED, assets=args.symbols).symbols("binance")
        print(
            f"N={args.symbols} symbols, R={args.rate:g} req/s (binance {emulator.limit_spec}, "
            f"weight {WEIGHT}/request), latency lognormal median {args.latency_ms:g} ms sigma 0.5; "
            f"bound N/R = {bound:.2f}s; flows concurrency {args.concurrency}, limit "
            f"{args.limit_share:g}x R; emulator "
            f"{emulator.url} (separate process); {os.cpu_count()} CPUs, python "
            f"{sys.version.split()[0]}, httpx {httpx.__version__}, trio {trio.__version__}"
        )
        results: list[Result] = []

        def measured(name: str, faults: dict[str, Any] | None, fn: Any) -> Result:
            emulator.reset(faults)
            wall, cpu, server = time.perf_counter(), client_seconds(), emulator.cpu_seconds()
            cycles, missing, seen, extra = fn()
            wall = time.perf_counter() - wall
            client_cpu = (client_seconds() - cpu) / wall
            server_cpu = (emulator.cpu_seconds() - server) / wall
            stats = emulator.stats()
            refused = stats["refused"]
            result = Result(name, cycles, missing, refused, seen, stats["requests"], extra,
                            client_cpu, server_cpu)
            results.append(result)
            return result

        if "flows" not in args.skip:
            measured(f"flows ({args.cycles} cycles)", None,
                     lambda: run_flows("flows", emulator.url, symbols, args, args.cycles))
        if "sequential" not in args.skip:
            def seq() -> Any:
                seconds, missing, seen, extra = run_sequential(emulator.url, symbols)
                return [seconds], [missing], seen, extra
            measured("sequential httpx", None, seq)
        if "gather" not in args.skip:
            def gat() -> Any:
                seconds, missing, seen, extra = run_gather(emulator.url, symbols)
                return [seconds], [missing], seen, extra
            measured("asyncio.gather", None, gat)
        faults = {"error_rate": 0.02, "hang_rate": 0.01, "hang_seconds": 30.0}
        if "faults" not in args.skip:
            measured(f"flows + faults ({args.fault_cycles} cycles)", faults,
                     lambda: run_flows("faults", emulator.url, symbols, args, args.fault_cycles))
        if "shared" not in args.skip:
            with RedisServer() as redis_server:
                measured(f"flows x3 shared ({args.shared_cycles} rounds)", None,
                         lambda: run_shards("x3", emulator.url, args, args.shared_cycles,
                                            redis_server.url))
                measured(f"flows x3 shared + faults ({args.shared_fault_cycles} rounds)", faults,
                         lambda: run_shards("x3 faults", emulator.url, args,
                                            args.shared_fault_cycles, redis_server.url))
    finally:
        emulator.stop()

    print()
    header = (f"{'variant':<28} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'bound s':>8} "
              f"{'p50/b':>6} {'max/b':>6} {'req/s':>6} {'429s':>6} {'missing':>8} {'cpu c/s':>9}  notes")
    print(header)
    print("-" * len(header))
    for r in results:
        p50, p99, worst = percentile(r.cycles, 0.5), percentile(r.cycles, 0.99), max(r.cycles)
        rate = r.requests / sum(r.cycles)
        seen = "" if r.seen_429 == r.refused else f" (client saw {r.seen_429})"
        print(f"{r.name:<28} {p50:>7.2f} {p99:>7.2f} {worst:>7.2f} {bound:>8.2f} "
              f"{p50 / bound:>5.2f}x {worst / bound:>5.2f}x {rate:>6.1f} {r.refused:>6} "
              f"{sum(r.missing):>8} {r.client_cpu * 100:>4.0f}/{r.server_cpu * 100:<4.0f}  {r.extra}{seen}")
    print()
    print("missing: symbols absent from a cycle's result, summed over cycles; req/s: requests "
          "the emulator answered (retries included) / cycle time; cpu c/s: % of one core used by "
          "this process (client) / the emulator, over the variant's run")

    checks = []
    by_name = {r.name.split(" (")[0]: r for r in results}
    if "flows" in by_name:
        r = by_name["flows"]
        checks.append((f"flows clean: every cycle within 1.1x the bound ({len(r.cycles)} cycles)",
                       max(r.cycles) <= 1.1 * bound, f"worst {max(r.cycles) / bound:.2f}x"))
        checks.append(("flows clean: zero 429s", r.refused == 0 and r.seen_429 == 0,
                       f"{r.refused} refused"))
        checks.append(("flows clean: no symbol missing", sum(r.missing) == 0,
                       f"{sum(r.missing)} missing"))
    if "flows + faults" in by_name:
        r = by_name["flows + faults"]
        p99 = percentile(r.cycles, 0.99)
        checks.append((f"flows + faults: p99 within 1.3x the bound ({len(r.cycles)} cycles)",
                       p99 <= 1.3 * bound, f"p99 {p99 / bound:.2f}x"))
        checks.append(("flows + faults: no symbol missing from any cycle", sum(r.missing) == 0,
                       f"missing per cycle {r.missing}"))
    for label in ("flows x3 shared", "flows x3 shared + faults"):
        if label in by_name:
            r = by_name[label]
            p50 = percentile(r.cycles, 0.5)
            checks.append((f"{label}: median round within 1.15x the bound ({len(r.cycles)} rounds)",
                           p50 <= 1.15 * bound, f"p50 {p50 / bound:.2f}x"))
            checks.append((f"{label}: zero 429s", r.refused == 0 and r.seen_429 == 0,
                           f"{r.refused} refused"))
            checks.append((f"{label}: no symbol missing", sum(r.missing) == 0,
                           f"missing per round {r.missing}"))
    print()
    for what, ok, got in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}: {got}")
    print(f"\n({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
