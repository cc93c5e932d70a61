"""The runtime: wiring, backpressure, supervision, drain, fan-out, function stages."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from flows import (
    Batch,
    ChangeDetector,
    Edge,
    Flow,
    FlowError,
    FlowFailed,
    Runtime,
    Supervision,
    Tick,
    stage,
)
from flows.testing import (
    GatedSink,
    ListSink,
    ListSource,
    assert_component_metrics,
    deadline,
    run_briefly,
    sample,
)
from sources.synthetic import SyntheticMarket


def ticks(n: int, *, symbols: int = 10, source: str = "t") -> list[Tick]:
    return [Tick(source, f"S{i % symbols}", 100.0 + i, float(i)) for i in range(n)]


def batches(n_batches: int, size: int) -> list[list[Tick]]:
    all_ticks = ticks(n_batches * size)
    return [all_ticks[i * size : (i + 1) * size] for i in range(n_batches)]


async def test_records_flow_through_and_every_component_moves_its_metrics():
    sink = ListSink()
    flow = Flow("f", sources=[ListSource(batches(5, 20))], stages=[ChangeDetector()], sinks=[sink])
    result, registry = await run_briefly(flow)
    assert result.clean and result.reason == "exhausted"
    assert len(sink.records) == 100
    assert_component_metrics(registry, "f", "list", "source")
    assert_component_metrics(registry, "f", "change", "stage")
    assert_component_metrics(registry, "f", "collect", "sink")


async def test_backpressure_blocks_the_source_and_bounds_memory(registry):
    source = SyntheticMarket(symbols=50, interval=0, unchanged=0.0, batch_size=10)  # endless
    sink = GatedSink()
    flow = Flow(
        "bp",
        sources=[source],
        stages=[ChangeDetector()],
        sinks=[sink],
        edges={"change": Edge(capacity=2), "gated": Edge(capacity=3)},
    )
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        stalled_at = source.emitted
        # Everything is blocked: the sink's channel is full, the stage waits to
        # send, the stage's channel is full, the source waits to send.
        assert rt.status()["actors"][2]["buffer"] == {"used": 3, "capacity": 3}
        assert rt.status()["actors"][1]["buffer"] == {"used": 2, "capacity": 2}
        # in flight: 3 queued at the sink + 1 held by the stage + 2 queued at the
        # stage + 1 the source is trying to send
        assert stalled_at <= (3 + 1 + 2 + 1) * 10
        for _ in range(5):
            await trio.testing.wait_all_tasks_blocked()
        assert source.emitted == stalled_at, "a blocked source must not keep producing"
        waits_before = sample(registry, "flows_send_wait_seconds_sum", "bp", "synthetic")
        sink.gate.set()
        with deadline(30, "100 more records at the sink"):
            while len(sink.records) < stalled_at + 100:
                await trio.lowlevel.checkpoint()
        rt.stop()
    waits_after = sample(registry, "flows_send_wait_seconds_sum", "bp", "synthetic")
    assert waits_after > waits_before
    assert sample(registry, "flows_send_wait_seconds_sum", "bp", "change") > 0


async def test_stop_drains_every_emitted_record_to_the_sinks(registry):
    source = SyntheticMarket(symbols=100, interval=0.01, unchanged=0.5, batch_size=25)
    slow, fast = ListSink(name="slow"), ListSink(name="fast")
    flow = Flow("drain", sources=[source], stages=[ChangeDetector()], sinks=[slow, fast])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(30, "1000 records emitted"):
            while source.emitted < 1000:
                await trio.sleep(0.01)  # lets the flow run on the real clock; not a sync point
        rt.stop()
    emitted = sample(registry, "flows_records_sent_total", "drain", "change")
    assert emitted > 0
    assert len(slow.records) == len(fast.records) == emitted
    assert sample(registry, "flows_records_received_total", "drain", "change") == source.emitted
    assert rt.state == "stopped" and rt.stop_reason == "stop"


async def test_drain_deadline_forces_the_stop(registry, autojump_clock):
    class Stubborn:
        name = "stubborn"

        async def run(self, inbox):
            await trio.sleep_forever()

    flow = Flow("stuck", sources=[SyntheticMarket(symbols=5, interval=1.0)], sinks=[Stubborn()])
    rt = Runtime(flow, registry=registry, metrics_addr=None, drain_timeout=5.0, duration=3.0)
    result = await rt.run()
    assert not result.clean
    assert result.reason == "duration"
    assert 8.0 <= trio.current_time() < 9.0


async def test_crashing_stage_is_restarted_and_counted(registry, autojump_clock):
    failures = 3

    @stage
    async def flaky(batch: Batch) -> Batch:
        nonlocal failures
        if failures:
            failures -= 1
            raise ValueError("boom")
        return batch

    sink = ListSink()
    flow = Flow(
        "sup",
        sources=[ListSource(batches(10, 5))],
        stages=[flaky],
        sinks=[sink],
        supervision=Supervision(max_restarts=5, window=60.0, backoff=0.5),
    )
    result, registry = await run_briefly(flow)
    assert result.clean
    assert sample(registry, "flows_actor_restarts_total", "sup", "flaky") == 3
    assert sample(registry, "flows_errors_total", "sup", "flaky", error_type="ValueError") == 3
    # the batches that raised are counted, the rest delivered
    assert sample(registry, "flows_records_discarded_total", "sup", "flaky", reason="error") == 15
    assert len(sink.records) == 35
    # backoff 0.5, 1.0, 2.0 seconds of (mock) time
    assert trio.current_time() >= 3.5


async def test_restart_budget_exhausted_stops_the_flow_with_a_clear_error(autojump_clock):
    class Broken:
        name = "broken"

        async def run(self, inbox, outbox):
            async for _ in inbox:
                raise RuntimeError("database exploded")

    flow = Flow(
        "budget",
        sources=[SyntheticMarket(symbols=5, interval=0.1)],
        stages=[Broken()],
        sinks=[ListSink()],
        supervision=Supervision(max_restarts=2, window=60.0, backoff=0.1),
    )
    with pytest.raises(FlowFailed) as info:
        await run_briefly(flow)
    message = str(info.value)
    assert "'broken'" in message and "restart budget 2" in message
    assert "RuntimeError: database exploded" in message


async def test_several_sources_merge_and_fan_out_to_every_sink():
    a = ListSource([ticks(30, source="a")], name="a")
    b = ListSource([ticks(20, source="b")], name="b")
    s1, s2 = ListSink(name="s1"), ListSink(name="s2")
    flow = Flow("fan", sources=[a, b], sinks=[s1, s2])
    result, registry = await run_briefly(flow)
    assert result.clean
    assert sorted(s1.records, key=repr) == sorted(s2.records, key=repr)
    assert len(s1.records) == 50
    assert {t.source for t in s1.records} == {"a", "b"}
    for name in ("a", "b"):
        assert_component_metrics(registry, "fan", name, "source")
    for name in ("s1", "s2"):
        assert_component_metrics(registry, "fan", name, "sink")


async def test_plain_functions_become_stages_and_drops_are_counted():
    def only_even(batch: Batch) -> Batch | None:
        kept = [t for t in batch if int(t.ts) % 2 == 0]
        return batch.replace(kept) if kept else None

    async def double(batch: Batch) -> Batch:
        return batch.replace([Tick(t.source, t.symbol, t.price * 2, t.ts) for t in batch])

    sink = ListSink()
    flow = Flow("fn", sources=[ListSource(batches(4, 10))], stages=[only_even, double], sinks=[sink])
    _, registry = await run_briefly(flow)
    assert [t.ts for t in sink.records] == [float(i) for i in range(0, 40, 2)]
    assert all(t.price == 2 * (100.0 + t.ts) for t in sink.records)
    assert sample(registry, "flows_records_discarded_total", "fn", "only_even", reason="filtered") == 20
    assert_component_metrics(registry, "fn", "only_even", "stage")
    assert_component_metrics(registry, "fn", "double", "stage")


def test_flow_definition_errors_name_the_culprit():
    src, sink = ListSource([]), ListSink()
    with pytest.raises(FlowError, match="no sources"):
        Flow("x", sources=[], sinks=[sink])
    with pytest.raises(FlowError, match="no sinks"):
        Flow("x", sources=[src], sinks=[])
    with pytest.raises(FlowError, match="two actors named 'collect'"):
        Flow("x", sources=[src], sinks=[sink, ListSink()])

    class NotAStage:
        name = "bad"

        async def run(self, inbox):
            pass

    with pytest.raises(FlowError, match="stage 'bad': run\\(\\) takes 1"):
        Flow("x", sources=[src], stages=[NotAStage()], sinks=[sink])
    with pytest.raises(FlowError, match="'nope'"):
        Flow("x", sources=[src], sinks=[sink], edges={"nope": Edge(capacity=1)})
    with pytest.raises(ValueError):
        Edge(capacity=0)


async def test_readiness_follows_actor_states(registry):
    sink = GatedSink()
    flow = Flow("ready", sources=[ListSource(batches(2, 2))], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        ready, reasons = rt.ready()
        assert ready and reasons == []  # a finite source that finished is fine
        sink.gate.set()
    ready, reasons = rt.ready()
    assert not ready and reasons[0] == "flow is stopped"


async def test_slow_batches_are_counted_and_logged_once_per_cooldown(caplog):
    from flows import SlowThresholds

    flow = Flow(
        "slow",
        sources=[ListSource(batches(10, 5))],
        stages=[ChangeDetector()],
        sinks=[ListSink()],
        slow=SlowThresholds(batch=(0.0, 1e9), cooldown=3600.0),
    )
    with caplog.at_level("WARNING", logger="flows.slow"):
        _, registry = await run_briefly(flow)
    assert sample(registry, "flows_slow_batches_total", "slow", "change", severity="warning") == 10
    lines = [r for r in caplog.records if r.name == "flows.slow" and "change batch" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].stage == "change" and lines[0].severity == "warning"


async def test_a_sink_that_quits_early_does_not_block_the_flow(registry):
    class Impatient:
        name = "impatient"

        async def run(self, inbox):
            await inbox.receive()  # takes one batch, then leaves

    keeper = ListSink()
    flow = Flow("quit", sources=[ListSource(batches(50, 4))], sinks=[Impatient(), keeper],
                capacity=2)
    result, registry = await run_briefly(flow)
    assert result.clean
    assert len(keeper.records) == 200
    gone = sample(registry, "flows_records_discarded_total", "quit", "impatient", reason="consumer_gone")
    assert gone == 200 - 4


async def test_finished_finite_sources_do_not_make_the_flow_unready(registry):
    sink = GatedSink()
    flow = Flow("fin", sources=[ListSource(batches(1, 1))], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.testing.wait_all_tasks_blocked()
        assert rt.ready() == (True, [])
        sink.gate.set()


def test_json_log_lines_carry_flow_and_stage():
    import json
    import logging

    from flows._log import JsonFormatter

    record = logging.LogRecord("flows.runtime", logging.WARNING, __file__, 1, "stage %s raised", ("x",), None)
    record.flow, record.stage = "f", "x"
    line = json.loads(JsonFormatter().format(record))
    assert line["event"] == "stage x raised"
    assert (line["flow"], line["stage"], line["level"]) == ("f", "x", "warning")
