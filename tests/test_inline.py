"""Inlined stages: a stage that offers ``process`` runs in its producer's
task (``InlinePort``) and counts, acks, restarts and drains as if it ran in
its own."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

import flows._runtime
from flows import Batch, ChangeDetector, Edge, Flow, FlowFailed, Runtime, Supervision, Tick, stage
from flows.testing import GatedSink, ListSink, deadline, run_briefly, sample
from sources.synthetic import SyntheticMarket


class AckingSource:
    """Sends the given batches with an ack hook each; keeps the outcomes."""

    def __init__(self, batches: list[list[Tick]], *, name: str = "acking") -> None:
        self.batches, self.name = batches, name
        self.outcomes: list[str] = []

    async def run(self, outbox: Any) -> None:
        for records in self.batches:
            with outbox.metrics.timed_batch():
                batch = Batch(records, acks=(self.outcomes.append,))
            await outbox.send(batch)


class EveryOther:
    """An inlinable stage keeping every other record; raises on the batches
    whose first price is in ``fail_on``."""

    name = "every_other"
    inline = True

    def __init__(self, fail_on: set[float] | None = None, *, always: bool = False) -> None:
        self.fail_on, self.always = fail_on or set(), always

    def process(self, batch: Batch, metrics: Any) -> Batch:
        if self.always or batch.records[0].price in self.fail_on:
            raise ValueError("boom")
        metrics.discarded("filtered", len(batch.records) - len(batch.records[::2]))
        return batch.replace(batch.records[::2])

    async def run(self, inbox: Any, outbox: Any) -> None:
        async for batch in inbox:
            await outbox.send(self.process(batch, inbox.metrics))


def ticks(n_batches: int, size: int) -> list[list[Tick]]:
    """Batches of 5 symbols twice over; every other batch repeats the one before."""
    return [[Tick("t", f"S{i % 5}", 100.0 + b // 2 + i % 5, float(b)) for i in range(size)]
            for b in range(n_batches)]


SERIES = (
    ("flows_records_received_total", "change", {}),
    ("flows_records_sent_total", "change", {}),
    ("flows_records_discarded_total", "change", {"reason": "unchanged"}),
    ("flows_batch_processing_seconds_count", "change", {}),
    ("flows_send_wait_seconds_count", "change", {}),
    ("flows_actor_up", "change", {}),
    ("flows_actor_restarts_total", "change", {}),
    ("flows_records_sent_total", "acking", {}),
    ("flows_send_wait_seconds_count", "acking", {}),
    ("flows_records_received_total", "collect", {}),
)


async def run_detector_flow(inline: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    monkeypatch.setattr(flows._runtime, "INLINE", inline)
    source, sink = AckingSource(ticks(12, 10)), ListSink()
    flow = Flow("inl", sources=[source], stages=[ChangeDetector(rel=0.001)], sinks=[sink])
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    result = await rt.run()
    assert result.clean
    figures = {(name, stage, *labels.values()): sample(rt.registry, name, "inl", stage, **labels)
               for name, stage, labels in SERIES}
    edges = {(e["from"], e["to"]): e.get("inline", False) for e in rt.status()["edges"]}
    return sink.records, source.outcomes, figures, edges


async def test_an_inlined_detector_counts_and_acks_as_one_in_its_own_task(monkeypatch):
    records, outcomes, figures, edges = await run_detector_flow(True, monkeypatch)
    records0, outcomes0, figures0, edges0 = await run_detector_flow(False, monkeypatch)
    assert edges == {("acking", "change"): True, ("change", "collect"): False}
    assert edges0 == {("acking", "change"): False, ("change", "collect"): False}
    assert records == records0 and 0 < len(records) < 120
    assert sorted(outcomes) == sorted(outcomes0) and sorted(set(outcomes)) == ["skipped", "written"]
    assert figures == figures0
    assert figures[("flows_records_received_total", "change")] == 120
    assert figures[("flows_batch_processing_seconds_count", "change")] == 12


async def test_a_stage_raising_inline_fails_its_batch_and_restarts_as_itself(autojump_clock):
    source, sink = AckingSource(ticks(6, 4)), ListSink()
    flow = Flow("crash", sources=[source], stages=[EveryOther(fail_on={100.0, 102.0})],
                sinks=[sink], supervision=Supervision(max_restarts=5, window=60.0, backoff=0.5))
    result, registry = await run_briefly(flow)
    assert result.clean
    # batches 0, 1, 4 and 5 start at 100 or 102: four crashes of the stage, none of the source
    assert sample(registry, "flows_actor_restarts_total", "crash", "every_other") == 4
    assert sample(registry, "flows_errors_total", "crash", "every_other", error_type="ValueError") == 4
    assert sample(registry, "flows_actor_restarts_total", "crash", "acking") == 0
    assert sorted(source.outcomes) == ["failed"] * 4 + ["written"] * 2
    assert len(sink.records) == 2 * 2
    assert trio.current_time() >= 0.5 + 1.0 + 2.0 + 4.0  # backed off as its own task would


async def test_an_inlined_stage_that_spends_its_restart_budget_fails_the_flow(autojump_clock):
    flow = Flow("budget", sources=[SyntheticMarket(symbols=5, interval=0.1)],
                stages=[EveryOther(always=True)], sinks=[ListSink()],
                supervision=Supervision(max_restarts=2, window=60.0, backoff=0.1))
    with pytest.raises(FlowFailed) as info:
        await run_briefly(flow)
    assert "stage 'every_other'" in str(info.value) and "restart budget 2" in str(info.value)


@pytest.mark.parametrize("edge", [Edge(capacity=2), Edge(policy="drop_oldest")])
async def test_an_edge_given_its_own_settings_keeps_its_channel(edge):
    flow = Flow("own", sources=[AckingSource(ticks(3, 5))], stages=[ChangeDetector()],
                sinks=[ListSink()], edges={"change": edge})
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    assert (await rt.run()).clean
    assert not any(e.get("inline") for e in rt.status()["edges"])


async def test_no_inlining_for_a_checkpointed_detector_a_fan_out_or_a_merge(tmp_path):
    a, b = AckingSource(ticks(2, 5), name="a"), AckingSource(ticks(2, 5), name="b")
    flow = Flow("mixed")
    saved = flow.source(a).then(ChangeDetector(checkpoint=tmp_path / "c.ckpt", name="saved"))
    saved.to(ListSink(name="s1"))
    fanned = flow.source(b)
    fanned.then(ChangeDetector(name="fan1")).to(ListSink(name="s2"))
    fanned.then(ChangeDetector(name="fan2")).to(ListSink(name="s3"))
    merged = flow.merge(saved, fanned).then(ChangeDetector(name="merged"))
    merged.to(ListSink(name="s4"))
    result, _ = await run_briefly(flow)
    assert result.clean
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    assert not any(rt._inlinable(slot) for slot in rt.slots)


async def test_a_stop_drains_through_an_inlined_stage():
    source, sink = SyntheticMarket(symbols=20, interval=0, unchanged=0.0, batch_size=10), ListSink()
    flow = Flow("stop", sources=[source], stages=[ChangeDetector()], sinks=[sink])
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(30, "500 records at the sink"):
            while len(sink.records) < 500:
                await trio.lowlevel.checkpoint()
        rt.stop()
    status = rt.status()
    assert rt.state == "stopped" and status["edges"][0].get("inline") is True
    change = next(a for a in status["actors"] if a["name"] == "change")
    assert change["state"] == "finished" and change["sent"] == len(sink.records)
    assert sample(rt.registry, "flows_actor_up", "stop", "change") == 0


async def test_a_stop_lets_a_blocked_inlined_stage_deliver_and_a_forced_stop_cancels_it(
        autojump_clock):
    """A stop cancels the source, in whose task the inlined stage runs: a
    send blocked on the full sink still goes out when the sink takes it (as
    in the stage's own draining task); past the drain timeout the stop is
    forced and cancels it."""
    for drains in (True, False):
        source = SyntheticMarket(symbols=5, interval=0, unchanged=0.0, batch_size=5)
        sink = GatedSink()
        flow = Flow("guard", sources=[source], stages=[ChangeDetector()], sinks=[sink],
                    edges={"gated": Edge(capacity=1)})
        rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None, drain_timeout=10.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await trio.testing.wait_all_tasks_blocked()  # the sink's channel is full, the send waits
            rt.stop()
            await trio.sleep(1.0)
            assert rt.state == "draining"
            if drains:
                sink.gate.set()
        assert rt._forced is not drains
        change = next(a for a in rt.status()["actors"] if a["name"] == "change")
        if drains:  # everything the stage took in reached the sink (nothing is unchanged)
            assert len(sink.records) == change["received"] == change["sent"] > 0


async def run_function_stage_flow(inline: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, ...]:
    monkeypatch.setattr(flows._runtime, "INLINE", inline)

    @stage
    def cheap_only(batch: Batch) -> Batch | None:
        if batch.records[0].price == 101.0:
            raise ValueError("boom")
        kept = [t for t in batch.records if t.price < 103.0]
        return Batch(kept) if kept else None  # a new Batch: the hooks are carried over

    source, sink = AckingSource(ticks(10, 5)), ListSink()
    flow = Flow("fn", sources=[source], stages=[cheap_only], sinks=[sink],
                supervision=Supervision(max_restarts=5, window=60.0, backoff=0.5))
    result, registry = await run_briefly(flow)
    assert result.clean
    figures = [sample(registry, name, "fn", "cheap_only", **labels) for name, labels in (
        ("flows_actor_restarts_total", {}), ("flows_records_received_total", {}),
        ("flows_records_sent_total", {}),
        ("flows_records_discarded_total", {"reason": "error"}),
        ("flows_records_discarded_total", {"reason": "filtered"}))]
    return sorted(t.price for t in sink.records), figures, sorted(source.outcomes)


async def test_a_sync_function_stage_inlined_counts_and_restarts_as_in_its_own_task(
        monkeypatch, autojump_clock):
    inlined = await run_function_stage_flow(True, monkeypatch)
    own_task = await run_function_stage_flow(False, monkeypatch)
    prices, figures, outcomes = inlined
    assert figures == [2, 50, 8, 10, 32]  # batches 2 and 3 raised; 103 and more filtered
    assert (prices, figures) == own_task[:2]
    # inlined, a batch that raised is acked failed; in its own task it is never acked
    assert outcomes == ["failed"] * 2 + ["skipped"] * 4 + ["written"] * 4
    assert own_task[2] == ["skipped"] * 4 + ["written"] * 4


class ImpatientSource:
    """Gives each send a second (its own timeout); keeps the outcomes."""

    name = "impatient"

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.timed_out = 0

    async def run(self, outbox: Any) -> None:
        for b in range(5):
            batch = Batch([Tick("t", f"S{i}", 100.0 + b, float(b)) for i in range(5)],
                          acks=(self.outcomes.append,))
            with trio.move_on_after(1.0) as scope:
                await outbox.send(batch)
            self.timed_out += scope.cancelled_caught


async def test_a_producers_own_timeout_still_cuts_a_blocked_inlined_send_short(autojump_clock):
    """Only a drain's cancel is guarded: a source's own timeout cancels the
    inlined stage's blocked send, whose batch then acks failed."""
    source, sink = ImpatientSource(), GatedSink()
    flow = Flow("impatient", sources=[source], stages=[ChangeDetector()], sinks=[sink],
                edges={"gated": Edge(capacity=1)})
    rt = Runtime(flow, registry=CollectorRegistry(), metrics_addr=None, drain_timeout=5.0)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await trio.sleep(10.0)  # five sends of a second each
            assert source.timed_out == 4  # the first batch fit in the sink's channel
            assert source.outcomes == ["failed"] * 4
            rt.stop()  # the sink never takes anything: the drain is forced
    assert rt._forced and source.outcomes == ["failed"] * 5


class Slow:
    """An inlinable stage that takes 20 ms of the CPU's time per batch."""

    name = "slow"
    inline = True

    def process(self, batch: Batch, metrics: Any) -> Batch:
        time.sleep(0.02)  # (stands for work: the process runs in its producer's task)
        return batch

    async def run(self, inbox: Any, outbox: Any) -> None:
        async for batch in inbox:
            await outbox.send(self.process(batch, inbox.metrics))


async def test_an_inlined_stages_time_is_its_own_not_its_producers():
    """A stage producer's processing time leaves out the inlined stage it
    feeds, as it leaves out its blocked sends."""

    @stage
    async def relay(batch: Batch) -> Batch:  # (async: kept in its own task)
        return batch

    flow = Flow("time", sources=[AckingSource(ticks(5, 2))], stages=[relay, Slow()],
                sinks=[ListSink()])
    result, registry = await run_briefly(flow)
    assert result.clean
    slow = sample(registry, "flows_batch_processing_seconds_sum", "time", "slow")
    relayed = sample(registry, "flows_batch_processing_seconds_sum", "time", "relay")
    assert slow >= 5 * 0.02 and relayed < 0.05
