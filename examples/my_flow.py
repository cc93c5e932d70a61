"""My first flow: a synthetic market, change detection, a custom filter, SQLite and console.

Run it from the repository root (stop it with Ctrl-C; it drains and exits 0):

    python -m flows.run examples/my_flow.py

or for a few seconds, without the metrics endpoints:

    python -m flows.run examples/my_flow.py --duration 3 --metrics-addr 0

Every 2 seconds the console prints one line per actor (records in and out,
records/s, drops by reason, p50/p99 batch time); the ticks that moved are
stored in ``my_ticks.db`` (a SQLite file in the current directory):

    sqlite3 my_ticks.db 'select symbol, count(*) from ticks group by symbol limit 5'

The graph is: synthetic -> change -> no_dust -> (sqlite, console).
"""

from flows import Batch, ChangeDetector, Flow
from sinks.console import ConsoleSink
from sinks.sqlite import SQLiteSink
from sources.synthetic import SyntheticMarket


def no_dust(batch: Batch) -> Batch:
    """Keep ticks priced at 1.0 or more.

    A plain function ``batch -> batch | None`` in ``stages=[...]`` becomes a
    stage named after the function. The records it leaves out are counted
    in ``flows_records_discarded_total{stage="no_dust", reason="filtered"}``.
    """
    return batch.replace([t for t in batch if t.price >= 1.0])


flow = Flow(
    "my_flow",
    sources=[SyntheticMarket(symbols=50, interval=0.2)],
    stages=[
        ChangeDetector(rel=0.001, heartbeat=30),  # 0.1% move, or 30 s of silence
        no_dust,
    ],
    sinks=[SQLiteSink("my_ticks.db"), ConsoleSink(every=2)],
)
