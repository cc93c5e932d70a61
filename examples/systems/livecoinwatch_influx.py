"""LiveCoinWatch -> InfluxDB: the top coins by rank, every minute, within the daily credits.

The fetcher this replaces took 78.7 s per poll cycle at p99 (its goal: under
45 s). Here the cycle is ``top / 100`` paged calls, paced by the source's
limits (60 a minute, and the day's credits spread over the day), and its
time is the ``flows_source_poll_cycle_seconds`` histogram: the Grafana
dashboard (``dashboards/flows.json``) shows its p50/p99 in "Sources:
poll-cycle time", and the credits left in "HTTP sources: daily credits".
Only prices that moved by 0.05% (or every 10 minutes, the heartbeat) are
written.

Offline (InfluxDB 1.x on 127.0.0.1:8086 with a database ``market``, and the
emulator)::

    python -m flows.testing.emulator --assets 300
    python -m flows.run examples/systems/livecoinwatch_influx.py --duration 120

Against the real API: ``FLOWS_EXCHANGE_URL= LIVECOINWATCH_API_KEY=... python
-m flows.run examples/systems/livecoinwatch_influx.py``; ``FLOWS_INFLUX_URL``
and ``FLOWS_INFLUX_DB`` choose the database.

    livecoinwatch (top 300) -> change (0.05%, heartbeat 10 min) -> influx
"""

from __future__ import annotations

import os

from flows import ChangeDetector, Flow
from sinks.influx import InfluxSink
from sources.livecoinwatch import LiveCoinWatchPrices


def build(url: str | None, influx_url: str, database: str, *, top: int = 300,
          every: float = 60.0, daily_credits: int = 10_000) -> Flow:
    """The fetcher, polling LiveCoinWatch at ``url`` (``None``: the real API)."""
    key = "test-key" if url else None  # the emulator's; else $LIVECOINWATCH_API_KEY
    source = LiveCoinWatchPrices(top=top, every=every, api_key=key, base_url=url,
                                 daily_credits=daily_credits)
    return Flow("livecoinwatch", sources=[source],
                stages=[ChangeDetector(rel=0.0005, heartbeat=600.0)],
                sinks=[InfluxSink(influx_url, database=database, measurement="coins")])


flow = build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765") or None,
             os.environ.get("FLOWS_INFLUX_URL", "http://127.0.0.1:8086"),
             os.environ.get("FLOWS_INFLUX_DB", "market"))
