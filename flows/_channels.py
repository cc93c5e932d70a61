"""Instrumented channel ends: what actors receive from and send to.

An ``Inbox`` wraps the receive end of a bounded trio memory channel, an
``Outbox`` the send ends of one or more (fan-out: one channel per
downstream consumer). Both count records and time waits into the owning
component's metrics. The runtime owns the channels and closes them; actors
just iterate and send, so a restarted actor keeps its place in the flow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Literal

import attrs
import trio

from ._metrics import ComponentMetrics
from ._records import Batch

__all__ = ["Edge", "Inbox", "Outbox", "POLICIES"]

Policy = Literal["block"]
POLICIES: tuple[str, ...] = ("block",)


@attrs.frozen(kw_only=True)
class Edge:
    """How the channel into one consumer behaves.

    ``capacity`` counts batches, not records. ``policy`` says what a send
    does when the channel is full: ``block`` waits (backpressure).
    """

    capacity: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    policy: Policy = attrs.field(default="block", validator=attrs.validators.in_(POLICIES))


class Inbox:
    """The receiving end of a component: ``async for batch in inbox``.

    Time between handing out a batch and the next request is the batch's
    processing time, less whatever the component's sends blocked meanwhile.
    """

    def __init__(
        self, receiver: trio.MemoryReceiveChannel[Batch], metrics: ComponentMetrics, capacity: int
    ) -> None:
        self._receiver = receiver
        self.metrics = metrics
        self.capacity = capacity
        self._handed_out: float | None = None
        self._wait_mark = 0.0
        metrics.buffer = self.buffer

    def buffer(self) -> tuple[int, int]:
        """(batches waiting, capacity)."""
        return self._receiver.statistics().current_buffer_used, self.capacity

    def _finish_previous(self) -> None:
        if self._handed_out is not None:
            m = self.metrics
            spent = time.perf_counter() - self._handed_out - (m.wait_seconds - self._wait_mark)
            m.observe_processing(max(spent, 0.0))
            self._handed_out = None

    async def receive(self) -> Batch:
        """The next batch; raises ``trio.EndOfChannel`` when upstream is done."""
        self._finish_previous()
        batch = await self._receiver.receive()
        self.metrics.received.inc(len(batch.records))
        self._handed_out = time.perf_counter()
        self._wait_mark = self.metrics.wait_seconds
        return batch

    def done(self) -> None:
        """Close the processing span of the last batch (called at actor exit)."""
        self._finish_previous()

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Batch:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            self._finish_previous()
            raise StopAsyncIteration from None


class Outbox:
    """The sending end of a component: ``await outbox.send(batch)``.

    With several downstream channels (fan-out) each gets the same batch in
    turn, so the slowest consumer sets the pace.
    """

    def __init__(
        self,
        senders: Sequence[trio.MemorySendChannel[Batch]],
        metrics: ComponentMetrics,
        *,
        observe_lag: bool = False,
    ) -> None:
        self._senders = list(senders)
        self.metrics = metrics
        self._observe_lag = observe_lag

    async def send(self, batch: Batch) -> None:
        """Send ``batch`` downstream; blocks while a consumer's channel is full."""
        records = batch.records
        if not records:
            await trio.lowlevel.checkpoint()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        m = self.metrics
        if self._observe_lag:
            ts = getattr(records[0], "ts", None)
            if ts is not None:
                m.lag.observe(max(time.time() - ts, 0.0))
        waited = 0.0
        for sender in self._senders:
            try:
                sender.send_nowait(batch)
            except trio.WouldBlock:
                t0 = time.perf_counter()
                await sender.send(batch)
                waited += time.perf_counter() - t0
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()
        m.wait_seconds += waited
        m.send_wait.observe(waited)
        m.sent.inc(len(records))

    def close(self) -> None:
        """Close every downstream channel end this outbox holds."""
        for sender in self._senders:
            sender.close()
