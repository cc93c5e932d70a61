"""Instrumented channel ends: what actors receive from and send to.

An ``Inbox`` wraps the receive end of a bounded trio memory channel, an
``Outbox`` the send ends of one or more (fan-out: one channel per
downstream consumer). Both count records and time waits into the owning
component's metrics. The runtime owns the channels and closes them; actors
just iterate and send, so a restarted actor keeps its place in the flow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Literal

import attrs
import trio

from ._metrics import ComponentMetrics
from ._records import Batch, Gap

__all__ = ["POLICIES", "Edge", "EdgePort", "Inbox", "InlinePort", "Outbox", "open_edge"]

Policy = Literal["block", "conflate", "drop_newest", "drop_oldest"]
POLICIES: tuple[str, ...] = ("block", "conflate", "drop_newest", "drop_oldest")


Guard = Callable[[], AbstractContextManager[trio.CancelScope]]
"""What shields a blocked send of an inlined stage (``Outbox.guard``)."""

_YIELD_EVERY = 16
"""Sends and receives that did not block yield to the scheduler this often."""


def _tick_key(record: Any) -> Hashable:
    return (record.source, record.symbol)


@attrs.frozen(kw_only=True)
class Edge:
    """How the channel into one consumer behaves.

    ``capacity`` counts batches, not records. ``policy`` says what a send
    does when the channel is full:

    - ``block`` (default): wait; the producer slows down (backpressure).
    - ``conflate``: never wait; records pending for the consumer are merged
      by ``key`` (latest wins), so memory is bounded by the number of keys
      and the consumer always gets the freshest value per key. Merged-away
      records are counted as discarded with reason ``conflated``.
    - ``drop_newest``: never wait; the batch being sent is dropped.
    - ``drop_oldest``: never wait; the oldest queued batch is dropped.

    Dropped records are counted on the consumer (reason ``drop_newest`` or
    ``drop_oldest``) and their batches acked as ``dropped``.
    """

    capacity: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    policy: Policy = attrs.field(default="block", validator=attrs.validators.in_(POLICIES))
    key: Callable[[Any], Hashable] = _tick_key


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
        self._streak = 0
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
        """The next batch; raises ``trio.EndOfChannel`` when upstream is done.

        A waiting batch is taken without a trip through the scheduler (the
        call still honours cancellation, and yields every few batches so no
        task starves); an empty channel waits as usual.
        """
        self._finish_previous()
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            batch = self._receiver.receive_nowait()
        except trio.WouldBlock:
            batch = await self._receiver.receive()
        else:
            self._streak += 1
            if self._streak >= _YIELD_EVERY:
                self._streak = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        self.metrics.received.inc(len(batch.records))
        self._handed_out = time.perf_counter()
        self._wait_mark = self.metrics.wait_seconds
        return batch

    def done(self) -> None:
        """Close the processing span of the last batch (called at actor exit)."""
        self._finish_previous()

    def close(self, reason: str = "consumer_gone", outcome: str = "dropped") -> None:
        """Stop receiving: batches still queued are counted as discarded for
        ``reason`` and acked ``outcome``, and later sends to this consumer
        are dropped and counted."""
        while True:
            try:
                batch = self._receiver.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                break
            self.metrics.discarded(reason, len(batch.records))
            batch.ack(outcome)
        self._receiver.close()

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

    With several consumers (fan-out) each gets the batch in turn, so the
    slowest blocking consumer sets the pace; the batch's ack hooks fire once,
    when every consumer has acked (with the worst outcome).

    A consumer that reads a branch of a split or route (``chains[i]``, see
    ``Flow``) gets only its branch's records; a batch divided among several
    consumers still acks once, when every part has been handled. Records of
    ``unrouted`` branches (splits nobody reads that way) are counted as
    discarded, reason ``unrouted``.
    """

    def __init__(
        self,
        ports: Sequence[EdgePort | InlinePort],
        metrics: ComponentMetrics,
        *,
        observe_lag: bool = False,
        chains: Sequence[tuple[Any, ...]] | None = None,
        unrouted: Sequence[tuple[Any, ...]] = (),
        freshness: Any = None,
    ) -> None:
        chains = list(chains) if chains is not None else [()] * len(ports)
        if len(chains) != len(ports):
            raise ValueError("Outbox: one chain per port")
        self._ports = list(ports)
        for port in dict.fromkeys(self._ports):
            port.attach()
        self._chains = chains
        self._unrouted = list(unrouted)
        self._routed = any(chains) or bool(self._unrouted)
        # the common case, one plain edge: sends go straight to its channel
        self._direct = (
            self._ports[0]._sender
            if len(self._ports) == 1 and not self._routed and type(self._ports[0]) is EdgePort
            else None
        )
        # one inlined stage (InlinePort): its process runs in this task
        self._inline = (
            self._ports[0]
            if len(self._ports) == 1 and not self._routed and type(self._ports[0]) is InlinePort
            else None
        )
        self.waits = [0.0] * len(self._ports)
        """Seconds each send to ``ports[i]`` blocked, in total (per-edge backpressure)."""
        self.metrics = metrics
        self._observe_lag = observe_lag
        self._freshness = freshness
        """A source's ``Freshness``: told of every batch sent."""
        self.gaps: Any = None
        """The runtime's ``GapLog`` (set for a source's outbox)."""
        self.guard: Guard | None = None
        """Set by the runtime on an inlined stage's outbox (``InlinePort``):
        its sends run in the producer's task, which a stop cancels; a
        blocked send cut short by that cancel is made again under the
        guard (a shielded scope a forced stop still cancels), so the stage
        still delivers what it took in, as it would in its own draining task."""
        self._streak = 0

    async def send(self, batch: Batch) -> None:
        """Send ``batch`` downstream; blocks while a ``block`` edge is full.

        An empty batch is not sent: its ack hooks get ``skipped``; a send
        cancelled before the batch went out acks it ``failed``.
        """
        records = batch.records
        guard = self.guard
        if guard is None:  # (an inlined stage's producer checked just before)
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException:  # cancelled before the batch went out
                batch.ack("failed")
                raise
        if not records:
            batch.ack("skipped")
            return
        m = self.metrics
        if self._observe_lag:
            ts = getattr(records[0], "ts", None)
            if ts is not None:
                m.lag.observe(max(time.time() - ts, 0.0))
        fresh = self._freshness
        if fresh is not None and self._inline is None:
            fresh.seen(records)
        direct = self._direct
        if direct is not None:
            try:
                direct.send_nowait(batch)
                waited = 0.0
            except (trio.WouldBlock, trio.BrokenResourceError):
                # blocks, or drops for a gone consumer
                waited = await _send_or_fail(self._ports[0], batch, guard)
                self.waits[0] += waited
            sent = len(records)
        elif self._inline is not None:  # (its first await comes after the ack hooks moved on)
            try:
                waited = await self._inline.send(batch, guard)
            finally:  # (after the stage read the records: they are in the cache now)
                if fresh is not None:
                    fresh.seen(records)
            self.waits[0] += waited
            sent = len(records)
        else:
            waited, sent = await self._send_parts(batch, guard)
        if waited:
            m.wait_seconds += waited
        else:
            self._streak += 1
            if self._streak >= _YIELD_EVERY:
                self._streak = 0
                await trio.lowlevel.cancel_shielded_checkpoint()
        m.send_wait.observe(waited)
        if sent:
            m.sent.inc(sent)

    async def _send_parts(self, batch: Batch, guard: Guard | None) -> tuple[float, int]:
        """Send each port its part of ``batch`` (fan-out, splits, routes):
        (seconds blocked, records that reached some consumer)."""
        ports = self._ports
        parts: Sequence[Batch | None]
        if self._routed:
            parts, sent = self._route(batch)
        else:
            copies = _fan_out(batch, len(ports)) if len(ports) > 1 and batch.acks else None
            parts, sent = (copies or [batch] * len(ports)), len(batch.records)
        waited = 0.0
        waits = self.waits
        for i, port in enumerate(ports):
            part = parts[i]
            if part is not None:
                try:
                    w = await port.send(part, guard)
                except BaseException:  # cancelled midway: the parts not sent settle the ack
                    _fail_unsent(parts[i:])
                    raise
                if w:
                    waits[i] += w
                    waited += w
        return waited, sent

    def _route(self, batch: Batch) -> tuple[list[Batch | None], int]:
        """Each port's part of ``batch`` (None: nothing for it) and the
        number of records that reached some consumer (the others, left in
        branches nobody reads, are counted ``unrouted``)."""
        records = batch.records
        picked: dict[tuple[Any, ...], list[Any]] = {(): records}
        split: dict[tuple[Any, ...], list[list[Any]]] = {}
        selected = [_pick(chain, picked, split) for chain in self._chains]
        lost = 0
        if self._unrouted and any(_pick(chain, picked, split) for chain in self._unrouted):
            delivered = {id(r) for part in selected for r in part}
            lost = sum(1 for r in records if id(r) not in delivered)
            if lost:
                self.metrics.discarded("unrouted", lost)
        n = sum(1 for part in selected if part)
        if n == 0:
            batch.ack("skipped")
            return [None] * len(selected), 0
        hooks, batch.acks = batch.acks, ()
        acks = (_Join(n, hooks),) if hooks else ()
        parts = [
            Batch(part, created=batch.created, acks=acks) if part else None for part in selected
        ]
        return parts, len(records) - lost

    def gap(
        self, symbols: Sequence[str] | None, start: float, end: float, reason: str
    ) -> None:
        """Report that this source had no data for ``symbols`` (None: all)
        from ``start`` to ``end`` (epoch seconds) for ``reason`` (a small
        fixed word): counted, logged, kept in /status, and sent down
        ``flow.gaps()``."""
        gap = Gap(self.metrics.stage, None if symbols is None else tuple(symbols),
                  start, end, reason)
        if self.gaps is not None:
            self.gaps.record(gap, self.metrics)
        else:
            self.metrics.labeled("flows_gaps_total", reason).inc()

    def close(self) -> None:
        """Let go of every downstream edge (the last producer closes it)."""
        ports, self._ports, self._direct, self._inline = self._ports, [], None, None
        for port in dict.fromkeys(ports):
            port.detach()


def _pick(
    chain: tuple[Any, ...], picked: dict[tuple[Any, ...], list[Any]],
    split: dict[tuple[Any, ...], list[list[Any]]],
) -> list[Any]:
    """The records that pass ``chain`` (a tuple of Flow branches), memoized
    so each splitter looks at each record once per send."""
    got = picked.get(chain)
    if got is None:
        head, branch = chain[:-1], chain[-1]
        key = (*head, branch.splitter)
        parts = split.get(key)
        if parts is None:
            parent = _pick(head, picked, split)
            parts = split[key] = branch.splitter.partition(parent) if parent else []
        got = picked[chain] = parts[branch.index] if parts else []
    return got


_RANK = {"skipped": 0, "written": 1, "dropped": 2, "failed": 3}


class _Join:
    """One ack hook shared by the fan-out copies of a batch."""

    __slots__ = ("hooks", "left", "worst")

    def __init__(self, n: int, hooks: tuple[Any, ...]) -> None:
        self.left, self.worst, self.hooks = n, "skipped", hooks

    def __call__(self, outcome: str) -> None:
        if _RANK.get(outcome, 3) > _RANK.get(self.worst, 3):
            self.worst = outcome
        self.left -= 1
        if self.left == 0:
            for hook in self.hooks:
                hook(self.worst)


async def _send_or_fail(port: EdgePort | InlinePort, batch: Batch, guard: Guard | None) -> float:
    """``port.send(batch, guard)``; cancelled while it blocks, ``batch``
    never went out and acks ``failed`` (as a fan-out's unsent parts do)."""
    try:
        return await port.send(batch, guard)
    except BaseException:
        batch.ack("failed")
        raise


def _fail_unsent(parts: Sequence[Batch | None]) -> None:
    """Ack the parts of a fan-out that were never sent as ``failed``, so a
    batch whose send was cut short (a stop, a cancel) still acks once: the
    parts already sent settle it when their consumers ack."""
    for part in parts:
        if part is not None:
            part.ack("failed")


def _fan_out(batch: Batch, n: int) -> list[Batch]:
    join = _Join(n, batch.acks)
    batch.acks = ()
    return [Batch(batch.records, created=batch.created, acks=(join,)) for _ in range(n)]


class EdgePort:
    """The producer side of the channel into one consumer, with its policy.

    Every producer attaches; the last to detach closes the channel, which is
    how the consumer learns its upstream is done.
    """

    def __init__(
        self,
        edge: Edge,
        sender: trio.MemorySendChannel[Batch],
        receiver: trio.MemoryReceiveChannel[Batch],
        consumer: ComponentMetrics,
    ) -> None:
        self.edge = edge
        self._sender = sender
        self._receiver = receiver  # drop_oldest takes the oldest batch out
        self._consumer = consumer
        self._users = 0

    def attach(self) -> EdgePort:
        self._users += 1
        return self

    def detach(self) -> None:
        self._users -= 1
        if self._users == 0:
            self.close()

    def close(self) -> None:
        self._sender.close()

    def pending(self) -> int:
        """Records held outside the channel (conflation buffer)."""
        return 0

    async def send(self, batch: Batch, guard: Guard | None = None) -> float:
        """Hand ``batch`` to the channel; returns the seconds it blocked
        (under ``guard``, when given: see ``Outbox.guard``)."""
        try:
            self._sender.send_nowait(batch)
            return 0.0
        except trio.WouldBlock:
            pass
        except trio.BrokenResourceError:
            self._drop(batch, "consumer_gone")
            return 0.0
        policy = self.edge.policy
        if policy == "block":
            t0 = time.perf_counter()
            try:
                await self._sender.send(batch)
            except trio.BrokenResourceError:
                self._drop(batch, "consumer_gone")
            except trio.Cancelled:  # (a cancelled send delivered nothing)
                if guard is None or not await self._deliver_despite_stop(batch, guard):
                    raise
            return time.perf_counter() - t0
        if policy == "drop_oldest":
            while True:
                try:
                    old = self._receiver.receive_nowait()
                except trio.WouldBlock:
                    old = None
                if old is not None:
                    self._drop(old, "drop_oldest")
                try:
                    self._sender.send_nowait(batch)
                    return 0.0
                except trio.WouldBlock:
                    continue
        self._drop(batch, "drop_newest")
        return 0.0

    async def _deliver_despite_stop(self, batch: Batch, guard: Guard) -> bool:
        """Send ``batch`` under ``guard`` after a cancel cut the send short
        (see ``Outbox.guard``); False when a forced stop cancelled this too.

        The first cancel is not raised again here: its scope stays
        cancelled, so the producer's next checkpoint raises it.
        """
        with guard() as scope:
            try:
                await self._sender.send(batch)
            except trio.BrokenResourceError:
                self._drop(batch, "consumer_gone")
        return not scope.cancelled_caught

    def _drop(self, batch: Batch, reason: str) -> None:
        self._consumer.discarded(reason, len(batch.records))
        batch.ack("dropped")


class ConflatingPort(EdgePort):
    """``conflate``: sends merge into a per-key buffer that a pump task moves
    into the channel whenever it has room."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._pending: dict[Hashable, Any] = {}
        self._acks: list[Any] = []
        self._created: float | None = None
        self._wake = trio.Event()
        self._closed = False

    def pending(self) -> int:
        return len(self._pending)

    async def send(self, batch: Batch, guard: Guard | None = None) -> float:
        pending, key = self._pending, self.edge.key
        before = len(pending)
        for record in batch.records:
            pending[key(record)] = record
        merged = len(batch.records) - (len(pending) - before)
        if merged:
            self._consumer.discarded("conflated", merged)
        self._acks.extend(batch.acks)
        batch.acks = ()
        if self._created is None:
            self._created = batch.created
        self._wake.set()
        return 0.0

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def pump(self) -> None:
        """Move pending records into the channel; closes it once detached.

        Cancelled (a forced stop), it counts what it still holds, in hand or
        pending, as discarded ``forced_stop`` and acks those batches ``failed``.
        """
        batch: Batch | None = None
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                if self._pending:
                    batch = self._take()
                    try:
                        await self._sender.send(batch)
                    except trio.BrokenResourceError:
                        self._drop(batch, "consumer_gone")
                    batch = None
                    self._wake.set()  # look again: more may have arrived meanwhile
                elif self._closed:
                    return
        finally:
            self._sender.close()
            for held in (batch, self._take() if self._pending else None):
                if held is not None:
                    self._consumer.discarded("forced_stop", len(held.records))
                    held.ack("failed")

    def _take(self) -> Batch:
        """The pending records as one batch, with every merged batch's acks."""
        batch = Batch(list(self._pending.values()), created=self._created, acks=self._acks)
        self._pending, self._acks, self._created = {}, [], None
        return batch


class InlinePort:
    """The producer side of an edge into an *inlined* stage: no channel;
    the stage's synchronous ``process(batch, metrics)`` runs in the
    producer's task and its result goes straight to the stage's outbox.

    The runtime inlines a stage that offers ``process`` and says it may be
    inlined (``inline`` true) when it is the only consumer of a single
    producer over a default edge (one not given its own capacity or
    policy): one channel hop and one task
    switch fewer per batch, and the same metrics: the stage's records
    received and sent, processing time, discards and errors are counted as
    if it ran in its own task (its buffer reads 0). Sends that block
    downstream block the producer, as a full channel would. A ``process``
    that raises fails its batch (acked ``failed``) and is handed to
    ``crashed`` (the runtime's supervision: count, back off, or fail the flow).
    """

    def __init__(self, stage: Any, metrics: ComponentMetrics, capacity: int,
                 crashed: Callable[[BaseException], Any]) -> None:
        self.stage = stage
        self.metrics = metrics
        self.capacity = capacity
        self.crashed = crashed
        self.outbox: Outbox | None = None
        """The stage's own outbox (set by the runtime once it exists)."""
        self.closed: Callable[[], None] | None = None
        """Called once the last producer let go (the stage is done)."""
        self.producer: ComponentMetrics | None = None
        """The producer's metrics: the stage's time is left out of the
        producer's processing time (as its blocked sends are)."""
        self._users = 0
        metrics.buffer = self.buffer

    def buffer(self) -> tuple[int, int]:
        """(batches waiting, capacity): nothing ever waits."""
        return 0, self.capacity

    def attach(self) -> InlinePort:
        self._users += 1
        return self

    def detach(self) -> None:
        self._users -= 1
        if self._users == 0 and self.closed is not None:
            self.closed()

    def pending(self) -> int:
        return 0

    async def send(self, batch: Batch, guard: Guard | None = None) -> float:
        """Process ``batch`` and send the result on; returns the seconds the
        stage's send blocked (the stage's outbox has its own guard)."""
        m = self.metrics
        m.received.inc(len(batch.records))
        t0 = time.perf_counter()
        try:
            out = self.stage.process(batch, m)
        except Exception as exc:
            batch.ack("failed")
            await self.crashed(exc)
            return 0.0
        spent = time.perf_counter() - t0
        m.observe_processing(spent)
        if self.producer is not None:
            self.producer.wait_seconds += spent
        if out is None:
            return 0.0
        assert self.outbox is not None
        waited = m.wait_seconds
        await self.outbox.send(out)
        return m.wait_seconds - waited


def open_edge(edge: Edge, consumer: ComponentMetrics) -> tuple[EdgePort, Inbox]:
    """The channel into one consumer: its producer-side port and its inbox."""
    sender, receiver = trio.open_memory_channel[Batch](edge.capacity)
    cls = ConflatingPort if edge.policy == "conflate" else EdgePort
    port = cls(edge, sender, receiver, consumer)
    inbox = Inbox(receiver, consumer, edge.capacity)
    if edge.policy == "conflate":
        consumer.pending = port.pending
    return port, inbox
