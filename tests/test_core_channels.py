"""Channel ends and edge policies (flows/_channels.py), behaviour that
mutation testing found unpinned (issue 20): the conflate port's close and
consumer-gone paths, what a merge keeps, drop policies' counts and acks,
fan-out acks, and the timing metrics' signs and attributions."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from flows import Batch, Edge, Flow, Runtime, Tick
from flows.testing import GatedSink, ListSink, sample

FLOW = "core"


def tick(symbol: str, price: float, ts: float = 1.0, source: str = "src") -> Tick:
    return Tick(source, symbol, price, ts)


class ScriptSource:
    """A source that runs ``script(source, outbox)``; ``send`` attaches an ack
    hook that records each batch's outcomes under its label."""

    def __init__(self, script: Callable[[Any, Any], Awaitable[None]], name: str = "src") -> None:
        self.script, self.name = script, name
        self.acks: dict[str, list[str]] = {}

    async def send(self, outbox: Any, label: str, records: list[Any], created: float | None = None) -> None:
        hook = lambda outcome: self.acks.setdefault(label, []).append(outcome)
        await outbox.send(Batch(records, created=created, acks=[hook]))

    async def run(self, outbox: Any) -> None:
        await self.script(self, outbox)


class BatchSink(ListSink):
    """Keeps each batch's records and creation time; ``got`` is set per batch."""

    def __init__(self, *, name: str = "sink", outcome: str = "written", stop_after: int | None = None):
        super().__init__(name=name)
        self.seen: list[tuple[list[Any], float]] = []
        self.outcome, self.stop_after = outcome, stop_after
        self.got = trio.Event()

    async def run(self, inbox: Any) -> None:
        async for batch in inbox:
            self.seen.append((list(batch.records), batch.created))
            self.records.extend(batch.records)
            batch.ack(self.outcome)
            self.got.set()
            self.got = trio.Event()
            if self.stop_after is not None and len(self.seen) >= self.stop_after:
                return  # the consumer quits early


async def run(flow: Flow, registry: CollectorRegistry, **options: Any) -> Any:
    with trio.fail_after(20):  # a hang is a failure, not a stuck test run
        return await Runtime(flow, registry=registry, metrics_addr=None, **options).run()


def discarded(registry: CollectorRegistry, stage: str, reason: str) -> float:
    return sample(registry, "flows_records_discarded_total", FLOW, stage, reason=reason)


# -- conflate ------------------------------------------------------------------


async def test_a_conflate_edge_ends_when_its_producer_ends_while_the_pump_is_idle(registry):
    sink = BatchSink()

    async def script(src, outbox):
        for n in range(2):  # the second send comes after the pump drained the first
            got = sink.got
            await src.send(outbox, f"b{n}", [tick("A", 1.0 + n)])
            await got.wait()
            await trio.testing.wait_all_tasks_blocked()  # the pump is idle now
        # the source ends while nothing is pending: the flow must still end

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink, edge=Edge(policy="conflate"))
    result = await run(flow, registry)
    assert result.clean
    assert [r.price for r in sink.records] == [1.0, 2.0]
    assert source.acks == {"b0": ["written"], "b1": ["written"]}


async def test_a_conflate_edge_merges_by_key_keeps_the_latest_and_the_first_time(registry):
    sink = GatedSink(name="sink")
    seen: list[tuple[list[float], float]] = []

    class Recording(GatedSink):
        async def run(self, inbox):
            await self.gate.wait()
            async for batch in inbox:
                seen.append(([r.price for r in batch.records], batch.created))
                batch.ack("written")

    sink = Recording(name="sink")

    async def script(src, outbox):
        await src.send(outbox, "a", [tick("X", 1.0), tick("Y", 1.0)], created=10.0)
        await trio.testing.wait_all_tasks_blocked()  # in the channel (capacity 1)
        await src.send(outbox, "b", [tick("X", 2.0), tick("Z", 2.0)], created=20.0)
        await trio.testing.wait_all_tasks_blocked()  # taken by the pump, blocked on the channel
        await src.send(outbox, "c", [tick("X", 3.0), tick("Y", 3.0)], created=30.0)
        await src.send(outbox, "d", [tick("X", 4.0)], created=40.0)
        await trio.testing.wait_all_tasks_blocked()
        sink.gate.set()

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink, edge=Edge(policy="conflate", capacity=1))
    await run(flow, registry)
    assert seen == [([1.0, 1.0], 10.0), ([2.0, 2.0], 20.0), ([4.0, 3.0], 30.0)]
    assert discarded(registry, "sink", "conflated") == 1  # d's X replaced c's
    assert source.acks == {k: ["written"] for k in "abcd"}  # merged batches ack once each


async def test_a_conflate_edge_whose_consumer_is_gone_acks_and_counts(registry):
    sink = BatchSink(stop_after=1)

    async def script(src, outbox):
        got = sink.got
        await src.send(outbox, "first", [tick("A", 1.0)])
        await got.wait()
        await trio.testing.wait_all_tasks_blocked()  # the consumer has quit
        await src.send(outbox, "late1", [tick("A", 2.0), tick("B", 2.0), tick("C", 2.0)])
        await trio.testing.wait_all_tasks_blocked()
        await src.send(outbox, "late2", [tick("A", 3.0), tick("D", 3.0)])

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink, edge=Edge(policy="conflate"))
    result = await run(flow, registry)
    assert result.clean
    assert source.acks == {"first": ["written"], "late1": ["dropped"], "late2": ["dropped"]}
    assert discarded(registry, "sink", "consumer_gone") == 5


async def test_a_forced_stop_counts_and_fails_what_a_conflate_edge_holds(registry):
    sink = GatedSink(name="sink")  # never opens: the drain cannot finish
    sent = trio.Event()

    async def script(src, outbox):
        await src.send(outbox, "a", [tick("X", 1.0)])  # into the channel
        await trio.testing.wait_all_tasks_blocked()
        await src.send(outbox, "b", [tick("X", 2.0), tick("Y", 2.0)])  # the pump's, blocked
        await trio.testing.wait_all_tasks_blocked()
        await src.send(outbox, "c", [tick("Z", 3.0)])  # pending
        sent.set()
        await trio.sleep_forever()

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink, edge=Edge(policy="conflate", capacity=1))
    rt = Runtime(flow, registry=registry, metrics_addr=None, drain_timeout=0.2)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await sent.wait()
            rt.stop()
    assert source.acks == {"a": ["failed"], "b": ["failed"], "c": ["failed"]}
    assert discarded(registry, "sink", "forced_stop") == 4


# -- drop policies ---------------------------------------------------------------


class Recording(GatedSink):
    """A gated sink that notes the prices of each batch it takes in ``seen``."""

    def __init__(self, seen: list[list[float]], *, name: str) -> None:
        super().__init__(name=name)
        self.seen = seen

    async def run(self, inbox):
        await self.gate.wait()
        async for batch in inbox:
            self.seen.append([r.price for r in batch.records])
            batch.ack("written")


async def three_batches_into_a_stalled_edge(registry, policy: str) -> tuple[ScriptSource, list]:
    seen: list[list[float]] = []

    sink = Recording(seen, name="sink")

    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0)])
        await src.send(outbox, "b", [tick("A", 2.0), tick("B", 2.0)])
        await src.send(outbox, "c", [tick("A", 3.0), tick("B", 3.0), tick("C", 3.0)])
        sink.gate.set()

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink, edge=Edge(policy=policy, capacity=1))
    result = await run(flow, registry)
    assert result.clean
    return source, seen


async def test_drop_newest_keeps_the_queued_batch(registry):
    source, seen = await three_batches_into_a_stalled_edge(registry, "drop_newest")
    assert seen == [[1.0]]
    assert source.acks == {"a": ["written"], "b": ["dropped"], "c": ["dropped"]}
    assert discarded(registry, "sink", "drop_newest") == 5
    assert sample(registry, "flows_records_sent_total", FLOW, "src") == 6
    # a drop never waits: three sends, no wait
    assert sample(registry, "flows_send_wait_seconds_count", FLOW, "src") == 3
    assert sample(registry, "flows_send_wait_seconds_sum", FLOW, "src") == 0.0


async def test_drop_oldest_keeps_the_newest_batch(registry):
    source, seen = await three_batches_into_a_stalled_edge(registry, "drop_oldest")
    assert seen == [[3.0, 3.0, 3.0]]
    assert source.acks == {"a": ["dropped"], "b": ["dropped"], "c": ["written"]}
    assert discarded(registry, "sink", "drop_oldest") == 3
    assert sample(registry, "flows_send_wait_seconds_count", FLOW, "src") == 3
    assert sample(registry, "flows_send_wait_seconds_sum", FLOW, "src") == 0.0


async def test_drop_oldest_on_a_fan_out_edge(registry):
    seen: list[list[float]] = []

    stalled, other = Recording(seen, name="stalled"), BatchSink(name="other")

    async def script(src, outbox):
        for i in range(3):
            await src.send(outbox, f"b{i}", [tick("A", float(i + 1))])
            await trio.testing.wait_all_tasks_blocked()
        stalled.gate.set()

    source = ScriptSource(script)
    flow = Flow(FLOW)
    stream = flow.source(source)
    stream.to(stalled, edge=Edge(policy="drop_oldest", capacity=1))
    stream.to(other)
    await run(flow, registry)
    assert seen == [[3.0]]
    assert [r.price for r in other.records] == [1.0, 2.0, 3.0]
    # each batch acks once, with the worse outcome of its two consumers
    assert source.acks == {"b0": ["dropped"], "b1": ["dropped"], "b2": ["written"]}
    assert discarded(registry, "stalled", "drop_oldest") == 2
    assert sample(registry, "flows_send_wait_seconds_sum", FLOW, "src") == 0.0


# -- block, consumers that quit, fan-out ---------------------------------------------


async def test_a_consumer_that_quits_early_gets_its_queued_and_later_batches_dropped(registry):
    sink = BatchSink(stop_after=1)

    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0)])
        await src.send(outbox, "b", [tick("A", 2.0), tick("B", 2.0)])  # queued
        await sink.got.wait()  # (the sink quits after "a")
        await trio.testing.wait_all_tasks_blocked()
        await src.send(outbox, "c", [tick("A", 3.0)])  # to a consumer that is gone

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink, edge=Edge(capacity=4))
    result = await run(flow, registry)
    assert result.clean
    assert source.acks == {"a": ["written"], "b": ["dropped"], "c": ["dropped"]}
    assert discarded(registry, "sink", "consumer_gone") == 3


@pytest.mark.parametrize(
    ("first", "second", "joined"),
    [("written", "failed", "failed"), ("skipped", "written", "written"),
     ("dropped", "written", "dropped"), ("written", "mystery", "mystery"),
     ("mystery", "written", "mystery"),
     ("skipped", "skipped", "skipped")],
)
async def test_a_fanned_out_batch_acks_once_with_the_worst_outcome(registry, first, second, joined):
    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0)])

    source = ScriptSource(script)
    flow = Flow(FLOW)
    stream = flow.source(source)
    stream.to(BatchSink(name="one", outcome=first))
    stream.to(BatchSink(name="two", outcome=second))
    await run(flow, registry)
    assert source.acks == {"a": [joined]}


class AckInTurn(ListSink):
    """Acks each batch with ``outcome``, after ``after`` (another one) acked."""

    def __init__(self, *, name: str, outcome: str, after: AckInTurn | None = None):
        super().__init__(name=name)
        self.outcome, self.after, self.acked = outcome, after, trio.Event()

    async def run(self, inbox: Any) -> None:
        async for batch in inbox:
            if self.after is not None:
                await self.after.acked.wait()
            batch.ack(self.outcome)
            self.acked.set()


@pytest.mark.parametrize(
    ("first", "second", "joined"),
    [("failed", "mystery", "failed"), ("mystery", "failed", "mystery"),  # a tie keeps the first
     ("dropped", "mystery", "mystery"), ("mystery", "dropped", "mystery")],
)
async def test_an_unknown_outcome_ranks_with_failed(registry, first, second, joined):
    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0)])

    source = ScriptSource(script)
    flow = Flow(FLOW)
    stream = flow.source(source)
    one = AckInTurn(name="one", outcome=first)
    stream.to(one)
    stream.to(AckInTurn(name="two", outcome=second, after=one))
    await run(flow, registry)
    assert source.acks == {"a": [joined]}


async def test_an_empty_batch_is_not_sent_and_acks_skipped(registry):
    sink = BatchSink()

    async def script(src, outbox):
        await src.send(outbox, "empty", [])
        await src.send(outbox, "full", [tick("A", 1.0)])

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(sink)
    await run(flow, registry)
    assert len(sink.seen) == 1
    assert source.acks == {"empty": ["skipped"], "full": ["written"]}
    assert sample(registry, "flows_records_sent_total", FLOW, "src") == 1


async def test_a_blocked_send_is_timed_as_send_wait_not_as_processing(registry):
    """A stage whose downstream is stalled spends its time waiting to send:
    that is send-wait, and its processing time leaves it out."""
    release = 0.3

    class Stalled(GatedSink):
        async def run(self, inbox):
            await self.gate.wait()
            async for batch in inbox:
                batch.ack("written")

    sink = Stalled(name="sink")

    async def opener():
        # real time: the metrics are read from time.perf_counter
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(release)
        sink.gate.set()

    async def script(src, outbox):
        for i in range(3):
            await src.send(outbox, f"b{i}", [tick("A", float(i + 1))])

    flow = Flow(FLOW)
    flow.source(ScriptSource(script)).then(lambda batch: batch, name="stage",
                                           edge=Edge(capacity=1)).to(sink, edge=Edge(capacity=1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        await run(flow, registry)
    waited = sample(registry, "flows_send_wait_seconds_sum", FLOW, "stage")
    busy = sample(registry, "flows_batch_processing_seconds_sum", FLOW, "stage")
    assert waited >= release * 0.9
    assert busy < release / 2  # the wait is not counted as work
    assert busy >= 0.0


async def test_processing_time_is_the_time_a_consumer_holds_a_batch(registry):
    hold = 0.05

    class Slow(ListSink):
        async def run(self, inbox):
            async for batch in inbox:
                t_end = time.perf_counter() + hold
                while time.perf_counter() < t_end:  # not a wait: busy holding the batch
                    await trio.sleep(0.01)
                batch.ack("written")

    async def script(src, outbox):
        for i in range(3):
            await src.send(outbox, f"b{i}", [tick("A", float(i + 1))])

    flow = Flow(FLOW)
    flow.source(ScriptSource(script)).to(Slow(name="sink"))
    await run(flow, registry)
    assert sample(registry, "flows_batch_processing_seconds_count", FLOW, "sink") == 3
    assert sample(registry, "flows_batch_processing_seconds_sum", FLOW, "sink") >= 3 * hold


async def test_lag_is_observed_at_sources_only_and_never_negative(registry):
    now = time.time()

    async def script(src, outbox):
        await src.send(outbox, "old", [tick("A", 1.0, ts=now - 30.0)])
        await src.send(outbox, "future", [tick("A", 2.0, ts=now + 3600.0)])

    flow = Flow(FLOW)
    flow.source(ScriptSource(script)).then(lambda batch: batch, name="stage").to(BatchSink())
    await run(flow, registry)
    lag_sum = sample(registry, "flows_source_lag_seconds_sum", FLOW, "src")
    assert sample(registry, "flows_source_lag_seconds_count", FLOW, "src") == 2
    assert 29.0 <= lag_sum <= 40.0  # 30 s, and 0 for the future one (clamped)
    assert sample(registry, "flows_source_lag_seconds_count", FLOW, "stage") == 0


async def test_an_endless_non_blocking_sender_lets_other_tasks_run(registry):
    """Sends that never block still yield now and then: a source that sends
    without pause into a dropping edge cannot starve the rest of the flow."""
    sink = BatchSink()

    async def script(src, outbox):
        i = 0
        while True:
            i += 1
            await outbox.send(Batch([tick("A", float(i))]))

    flow = Flow(FLOW)
    flow.source(ScriptSource(script)).to(sink, edge=Edge(policy="drop_newest", capacity=1))
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await sink.got.wait()
            rt.stop()
    assert sink.records


async def test_fanned_out_and_split_batches_keep_their_creation_time(registry):
    """End-to-end latency runs from the source's batch, whatever the graph
    does to it on the way."""

    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0), tick("B", 2.0)], created=12.5)
        await src.send(outbox, "b", [tick("A", 1.0)], created=13.5)  # nothing for `high`

    source = ScriptSource(script)
    one, two, low, high = (BatchSink(name=n) for n in ("one", "two", "low", "high"))
    flow = Flow(FLOW)
    stream = flow.source(source)
    stream.to(one)
    stream.to(two)
    cheap, dear = stream.split(lambda t: t.price < 1.5, name="cheap")
    cheap.to(low)
    dear.to(high)
    await run(flow, registry)
    for sink in (one, two, low):
        assert [created for _, created in sink.seen] == [12.5, 13.5]
    assert [created for _, created in high.seen] == [12.5]  # no empty batch for b
    assert [r.symbol for r in low.records] == ["A", "A"] and [r.symbol for r in high.records] == ["B"]
    assert source.acks == {"a": ["written"], "b": ["written"]}


async def test_a_fanned_out_batch_keeps_its_creation_time(registry):
    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0)], created=7.25)

    source = ScriptSource(script)
    one, two = BatchSink(name="one"), BatchSink(name="two")
    flow = Flow(FLOW)
    stream = flow.source(source)
    stream.to(one)
    stream.to(two)
    await run(flow, registry)
    assert [c for _, c in one.seen] == [7.25] and [c for _, c in two.seen] == [7.25]


async def test_a_producer_blocked_on_a_consumer_that_quits_gets_its_batch_dropped(registry):
    class Quitter(ListSink):
        async def run(self, inbox):
            batch = await inbox.receive()
            batch.ack("written")
            await trio.testing.wait_all_tasks_blocked()  # the producer waits for room
            # and the consumer leaves

    async def script(src, outbox):
        await src.send(outbox, "a", [tick("A", 1.0)])
        await src.send(outbox, "b", [tick("A", 2.0), tick("B", 2.0)])
        await src.send(outbox, "c", [tick("A", 3.0), tick("B", 3.0), tick("C", 3.0)])

    source = ScriptSource(script)
    flow = Flow(FLOW)
    flow.source(source).to(Quitter(name="sink"), edge=Edge(capacity=1))
    result = await run(flow, registry)
    assert result.clean
    assert source.acks == {"a": ["written"], "b": ["dropped"], "c": ["dropped"]}
    assert discarded(registry, "sink", "consumer_gone") == 5
