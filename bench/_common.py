"""What the benchmarks share: synthetic input and a source that only sends it."""

from __future__ import annotations

from typing import Any

from flows import Batch, Outbox
from sources.synthetic import SyntheticMarket


def make_records(n: int, **market: Any) -> list[Any]:
    """``n`` ticks from ``SyntheticMarket(seed=1, **market)``, whole
    universes at a time (the last one cut)."""
    source = SyntheticMarket(seed=1, **market)
    records: list[Any] = []
    while len(records) < n:
        records.extend(source.tick())
    return records[:n]


def cut(records: list[Any], size: int) -> list[list[Any]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


class PregenSource:
    """Source: sends pre-generated record lists, one Batch each, then ends
    (no per-batch metrics, unlike ``flows.testing.ListSource``: the
    benchmarks measure what comes after the source)."""

    def __init__(self, batches: list[list[Any]], *, name: str = "pregen") -> None:
        self.batches = batches
        self.name = name

    async def run(self, outbox: Outbox) -> None:
        send = outbox.send
        for records in self.batches:
            await send(Batch(records))
