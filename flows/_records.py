"""Records and batches: what flows through a flow."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

__all__ = ["OUTCOMES", "AckHook", "Batch", "Gap", "Tick"]


class Tick(msgspec.Struct, frozen=True, gc=False):
    """One price observation.

    ``ts`` is the exchange's timestamp in epoch seconds. ``bid``, ``ask`` and
    ``volume`` are optional because not every API sends them.
    """

    source: str
    symbol: str
    price: float
    ts: float
    bid: float | None = None
    ask: float | None = None
    volume: float | None = None


class Gap(msgspec.Struct, frozen=True, gc=False):
    """Where a feed was incomplete: ``source`` had no data for ``symbols``
    (``None``: all of them) from ``start`` to ``end`` (epoch seconds), for
    ``reason`` (a small fixed word: ``closed``, ``error``, ``silent``,
    ``timeout``, ``server`` for a lost connection, ``sequence`` for lost
    updates, ``poll_failed``, ``circuit_open``)."""

    source: str
    symbols: tuple[str, ...] | None
    start: float
    end: float
    reason: str


AckHook = Callable[[str], None]
"""Called once per batch with its outcome, one of ``OUTCOMES``."""

OUTCOMES = ("written", "skipped", "dropped", "failed")
"""What became of a batch: every sink wrote it; a stage dropped all its
records (unchanged, filtered); an edge policy dropped it; a sink gave up on
it. With fan-out, the worst outcome over the sinks wins (failed > dropped >
written; skipped only when nothing was written)."""


class Batch:
    """A list of records moved as one message on a channel.

    ``created`` is the ``time.monotonic()`` at which the source made the
    batch; sinks use it for end-to-end latency. ``acks`` holds the hooks a
    source attached (acknowledgements); derived batches carry them on.
    """

    __slots__ = ("acks", "created", "records")

    def __init__(
        self,
        records: list[Any],
        *,
        created: float | None = None,
        acks: Sequence[AckHook] = (),
    ) -> None:
        self.records = records
        self.created = time.monotonic() if created is None else created
        self.acks: tuple[AckHook, ...] = tuple(acks)

    def replace(self, records: list[Any]) -> Batch:
        """A batch holding ``records`` with this batch's time and ack hooks.

        The hooks move to the new batch: this one will not call them.
        """
        acks, self.acks = self.acks, ()
        return Batch(records, created=self.created, acks=acks)

    def ack(self, outcome: str) -> None:
        """Call the ack hooks with ``outcome``; at most once per batch."""
        hooks, self.acks = self.acks, ()
        for hook in hooks:
            hook(outcome)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    def __repr__(self) -> str:
        return f"Batch({len(self.records)} records, acks={len(self.acks)})"
