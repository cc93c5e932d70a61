"""Delivery guarantees: acks exactly once per batch, edge policies, conflation."""

from __future__ import annotations

import os
import signal
from collections import Counter

import trio
import trio.testing

from flows import Batch, ChangeDetector, Edge, Flow, Runtime, Tick
from flows.testing import GatedSink, ListSink, deadline, sample


class CountingSource:
    """Sends ``n`` batches of ``size`` ticks, each carrying an ack hook."""

    def __init__(self, n: int | None, size: int = 10, *, symbols: int = 10, name: str = "count"):
        self.n, self.size, self.symbols, self.name = n, size, symbols, name
        self.acks: dict[int, list[str]] = {}
        self.sent = 0

    def hook(self, i: int):
        return lambda outcome: self.acks.setdefault(i, []).append(outcome)

    async def run(self, outbox):
        while self.n is None or self.sent < self.n:
            i = self.sent
            records = [
                Tick(self.name, f"S{j % self.symbols}", 100.0 + i, float(i)) for j in range(self.size)
            ]
            await outbox.send(Batch(records, acks=[self.hook(i)]))
            self.sent += 1

    def assert_acked_once(self) -> Counter:
        """Each batch sent acked once; a send cut short by a stop (not sent) acks ``failed``."""
        if self.acks.get(self.sent) == ["failed"]:
            del self.acks[self.sent]
        assert sorted(self.acks) == list(range(self.sent)), "a batch was never acked"
        assert all(len(v) == 1 for v in self.acks.values()), "a batch was acked twice"
        return Counter(v[0] for v in self.acks.values())


class SlowSink(ListSink):
    """Takes one scheduler round per batch (slower than ListSink)."""

    async def run(self, inbox):
        async for batch in inbox:
            for _ in range(5):
                await trio.lowlevel.checkpoint()
            self.records.extend(batch.records)
            batch.ack("written")


async def run(flow, registry, **kw):
    return await Runtime(flow, registry=registry, metrics_addr=None, **kw).run()


async def test_skipped_batches_are_acked_skipped(registry):
    # the same prices over and over: after the first batch everything is unchanged
    class Repeating(CountingSource):
        async def run(self, outbox):
            while self.sent < self.n:
                records = [Tick("r", f"S{j}", 1.0, float(self.sent)) for j in range(self.size)]
                await outbox.send(Batch(records, acks=[self.hook(self.sent)]))
                self.sent += 1

    source = Repeating(20)
    flow = Flow("skip", sources=[source], stages=[ChangeDetector()], sinks=[ListSink()])
    await run(flow, registry)
    assert source.assert_acked_once() == {"written": 1, "skipped": 19}


async def test_fan_out_acks_once_when_every_sink_wrote(registry):
    source = CountingSource(200)
    fast, slow = ListSink(name="fast"), SlowSink(name="slow")
    acked_early = []
    original = source.hook

    def check(i):
        inner = original(i)

        def hook(outcome):
            # by the time the joint ack fires, both sinks hold the batch
            acked_early.append(len(fast.records) < (i + 1) * 10 or len(slow.records) < (i + 1) * 10)
            inner(outcome)

        return hook

    source.hook = check
    flow = Flow("fan", sources=[source], sinks=[fast, slow])
    await run(flow, registry)
    assert source.assert_acked_once() == {"written": 200}
    assert not any(acked_early)


async def test_drop_newest_edge_acks_dropped_batches_as_dropped(registry):
    source = CountingSource(100)
    sink = GatedSink()
    flow = Flow("drop", sources=[source], sinks=[sink],
                edges={"gated": Edge(capacity=4, policy="drop_newest")})
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()  # the source ran to its end without blocking
        assert source.sent == 100
        sink.gate.set()
    outcomes = source.assert_acked_once()
    assert outcomes == {"written": 4, "dropped": 96}
    assert [t.ts for t in sink.records[::10]] == [0.0, 1.0, 2.0, 3.0]  # the first ones stayed
    assert sample(registry, "flows_records_discarded_total", "drop", "gated", reason="drop_newest") == 960


async def test_drop_oldest_edge_keeps_the_newest(registry):
    source = CountingSource(100)
    sink = GatedSink()
    flow = Flow("old", sources=[source], sinks=[sink],
                edges={"gated": Edge(capacity=4, policy="drop_oldest")})
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        sink.gate.set()
    assert source.assert_acked_once() == {"written": 4, "dropped": 96}
    assert [t.ts for t in sink.records[::10]] == [96.0, 97.0, 98.0, 99.0]
    assert sample(registry, "flows_records_discarded_total", "old", "gated", reason="drop_oldest") == 960


async def test_sigterm_drain_acks_every_batch_exactly_once(registry):
    source = CountingSource(None, symbols=5)  # endless
    sinks = [ListSink(name="a"), SlowSink(name="b")]
    flow = Flow("term", sources=[source], stages=[ChangeDetector()], sinks=sinks)
    rt = Runtime(flow, registry=registry, metrics_addr=None, handle_signals=True)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(30, "300 records sent"):
            while source.sent < 300:
                await trio.lowlevel.checkpoint()
        os.kill(os.getpid(), signal.SIGTERM)
    assert rt.stop_reason == "signal SIGTERM"
    outcomes = source.assert_acked_once()
    assert outcomes["written"] == source.sent
    # 10 records a batch over 5 symbols: the change detector keeps the first 5
    assert len(sinks[0].records) == len(sinks[1].records) == 5 * source.sent


async def test_conflation_bounds_memory_and_delivers_the_latest_price(registry):
    keys, updates = 1000, 100

    class Updates:
        name = "updates"
        peak = 0

        async def run(self, outbox):
            for round_ in range(updates):
                for start in range(0, keys, 250):
                    records = [Tick("u", f"K{k}", 1.0 + round_, float(round_))
                               for k in range(start, start + 250)]
                    await outbox.send(Batch(records))
                    self.peak = max(self.peak, rt.status()["actors"][1]["buffer"]["pending_records"])

    sink = GatedSink()
    source = Updates()
    flow = Flow("conf", sources=[source], sinks=[sink],
                edges={"gated": Edge(capacity=1, policy="conflate")})
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        # the source never blocked: it sent every update while the sink was stalled
        assert sample(registry, "flows_records_sent_total", "conf", "updates") == keys * updates
        sink.gate.set()
    assert source.peak <= keys
    latest: dict[str, float] = {}
    for t in sink.records:
        latest[t.symbol] = t.price
    assert latest == {f"K{k}": float(updates) for k in range(keys)}
    # what reached the sink: the channel's one batch, the one the pump held
    # waiting for room, and one conflated set: never more than 3 x the keys
    assert len(sink.records) <= 3 * keys
    conflated = sample(registry, "flows_records_discarded_total", "conf", "gated", reason="conflated")
    assert conflated + len(sink.records) == keys * updates
