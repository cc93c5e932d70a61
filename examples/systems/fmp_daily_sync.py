"""A daily stock sync from Financial Modeling Prep into PostgreSQL.

For the whole universe (19,205 symbols in the system this replaces):
yesterday's end-of-day prices in one bulk call, then each symbol's
dividends and company profile, one call each, skipping the symbols
fetched within ``max_age`` (20 h: a rerun the same day costs almost
nothing). Each per-symbol source keeps its own state file of when it
fetched what, checkpointed every 100 symbols, so a sync killed with
SIGKILL resumes where it stopped when run again. Progress (with an ETA)
is logged every 5 s, and each source's last log line says how many calls
it made and how many the staleness filter saved.

Offline (PostgreSQL reachable at ``FLOWS_PG_DSN``, and the emulator with
the full universe)::

    python -m flows.testing.emulator --stocks 19205 --rate-limit fmp=limit=750
    FLOWS_PG_DSN=postgresql://postgres@127.0.0.1:5432/postgres \\
        python -m flows.run examples/systems/fmp_daily_sync.py

Against the real API: ``FLOWS_EXCHANGE_URL= FMP_API_KEY=... python -m
flows.run examples/systems/fmp_daily_sync.py`` (``FMP_PER_MINUTE``: your
plan's limit, 750 on Premium).

    fmp_eod       -> postgres table eod_prices (Ticks: close, volume)
    fmp_dividends -> postgres table dividends  (Dividend: amount, ex/record/payment dates, ...)
    fmp_profiles  -> postgres table profiles   (Profile: price, market cap, company, sector, ...)
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import msgspec

from flows import Flow, RateLimit
from sinks.postgres import PostgresSink
from sources.fmp import FMPDividends, FMPEndOfDay, FMPProfiles

MAX_AGE = 20 * 3600.0


def universe(url: str | None, api_key: str) -> list[str]:
    """Every symbol FMP lists (``/stable/stock-list``)."""
    answer = httpx.get(f"{url or FMPEndOfDay.DEFAULT_URL}/stable/stock-list",
                       params={"apikey": api_key}, timeout=60.0)
    answer.raise_for_status()
    return [row["symbol"] for row in msgspec.json.decode(answer.content)]


def build(url: str | None, dsn: str, state_dir: Path = Path("."), *,
          symbols: list[str] | None = None, per_minute: float = 750.0,
          max_age: float = MAX_AGE, progress: bool | None = None) -> Flow:
    """The sync from FMP at ``url`` (``None``: the real API) into ``dsn``."""
    key = "test-key" if url else os.environ.get("FMP_API_KEY", "")  # the emulator's, or yours
    if not key:
        raise ValueError("set FMP_API_KEY to your Financial Modeling Prep API key")
    symbols = symbols if symbols is not None else universe(url, key)
    # one limiter per source: give each its share of the plan's per-minute calls
    share = {"api_key": key, "base_url": url, "once": True, "progress": progress}
    flow = Flow("fmp_sync")
    flow.source(FMPEndOfDay(limits=[RateLimit(1, 60.0)], **share)).to(
        PostgresSink(dsn, table="eod_prices", name="eod_db"))
    # Dividend and Profile records go to their own tables, ``dividends`` and ``profiles``
    for cls, table in ((FMPDividends, "dividends"), (FMPProfiles, "profiles")):
        source = cls(symbols=symbols, state=state_dir / f"{table}.state.json", max_age=max_age,
                     limits=[RateLimit(per_minute / 2, 60.0)], concurrency=8, **share)
        flow.source(source).to(PostgresSink(dsn, name=f"{table}_db", batch_size=5000))
    return flow


def flow() -> Flow:
    """What ``python -m flows.run`` runs (built when called: it asks FMP for the universe)."""
    return build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765") or None,
                 os.environ.get("FLOWS_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"),
                 Path(os.environ.get("FLOWS_STATE_DIR", ".")),
                 per_minute=float(os.environ.get("FMP_PER_MINUTE", "750")))
