"""Custom stages: a class with ``run(inbox, outbox)`` and an ``@stage`` function.

A finite flow: the source stops after 60 records, the flow drains and the
command exits 0 by itself. Run it from the repository root:

    python -m flows.run examples/custom_stage.py --metrics-addr 0

It prints each record that reaches the ``print`` sink (prices converted to
EUR, majors only), then a one-line-per-actor summary from the ``summary``
sink.

The graph is: synthetic -> change -> to_eur -> majors -> (print, summary).
"""

from __future__ import annotations

import msgspec

from flows import Batch, ChangeDetector, Edge, Flow, Inbox, Outbox, Tick, stage
from sinks.console import ConsoleSink
from sources.synthetic import SyntheticMarket


class ToQuote:
    """Stage: re-quote ``...USDT`` ticks in another currency at a fixed rate.

    A class-based stage is any object with a ``name`` and an
    ``async def run(self, inbox, outbox)``. It iterates its inbox until
    upstream is done and sends batches on; it does not close either end
    (the runtime does, and restarts ``run`` on the same channels if it
    raises). Records received, sent, batch processing time and send waits
    are measured by the inbox and outbox; the stage only counts what it
    drops, with a reason from a small fixed set.

    Parameters:
        rate: how many units of ``quote`` one USDT is worth.
        quote: the new quote currency, replacing ``USDT`` in the symbol.
        name: the stage's name (the ``stage`` label of its metrics).
    """

    def __init__(self, rate: float, *, quote: str = "EUR", name: str = "to_eur") -> None:
        if not rate > 0:
            raise ValueError("rate must be > 0")
        self.rate, self.quote, self.name = rate, quote, name

    def convert(self, tick: Tick) -> Tick:
        return msgspec.structs.replace(
            tick,
            symbol=tick.symbol.removesuffix("USDT") + self.quote,
            price=round(tick.price * self.rate, 8),
        )

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for batch in inbox:
            out = [self.convert(t) for t in batch if t.symbol.endswith("USDT")]
            if len(out) < len(batch):
                inbox.metrics.discarded("invalid", len(batch) - len(out))
            # replace() keeps the batch's creation time (end-to-end latency)
            # and moves its acknowledgement hooks to the new batch. An empty
            # batch is not sent on; its hooks are called with "skipped".
            await outbox.send(batch.replace(out))


MAJORS = ("BTC", "ETH", "SOL")


@stage
async def majors(batch: Batch) -> Batch | None:
    """Keep BTC, ETH and SOL; the rest is counted as discarded (``filtered``)."""
    kept = [t for t in batch if t.symbol.startswith(MAJORS)]
    return batch.replace(kept) if kept else None


flow = Flow(
    "custom",
    sources=[SyntheticMarket(symbols=6, interval=0.05, unchanged=0.3, limit=60, seed=7)],
    stages=[ChangeDetector(rel=0.0005), ToQuote(0.92), majors],
    sinks=[
        ConsoleSink(mode="records", name="print"),
        ConsoleSink(every=5.0, name="summary"),
    ],
    # Channel settings per consumer: a smaller inbox for the printer.
    edges={"print": Edge(capacity=2)},
)
