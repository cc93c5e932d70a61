"""Runtime behaviour that mutation testing found unpinned (issue 20): the
restart backoff schedule and budget window, how a run ends (reason, clean,
seconds), a second stop, readiness reasons, the totals line, and which
metrics the runtime moves for whom."""

from __future__ import annotations

import math
import time

import pytest
import trio
import trio.testing

from flows import Batch, Flow, FlowError, FlowFailed, Runtime, Supervision, Tick
from flows.testing import GatedSink, ListSink, ListSource, sample

FLOW = "core"


def ticks(n: int, start: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i}", 100.0 + i, time.time()) for i in range(start, start + n)]


class Crashing:
    """A source that raises on each of its first ``crashes`` runs (at the
    trio times kept in ``starts``), then sends one batch and ends."""

    def __init__(self, crashes: int, name: str = "crashy", gaps: list[float] | None = None) -> None:
        self.crashes, self.name = crashes, name
        self.starts: list[float] = []
        self.gaps = gaps or []

    async def run(self, outbox) -> None:
        self.starts.append(trio.current_time())
        n = len(self.starts)
        if n <= len(self.gaps):
            await trio.sleep(self.gaps[n - 1])  # healthy for a while before crashing
        if n <= self.crashes:
            raise RuntimeError(f"boom {n}")
        await outbox.send(Batch(ticks(1)))


def runtime(flow: Flow, registry, **options) -> Runtime:
    return Runtime(flow, registry=registry, metrics_addr=None, **options)


async def test_restarts_back_off_doubling_up_to_max_backoff(registry, autojump_clock):
    source = Crashing(5)
    flow = Flow(FLOW, sources=[source], sinks=[ListSink()],
                supervision=Supervision(max_restarts=10, backoff=0.5, max_backoff=3.0))
    result = await runtime(flow, registry).run()
    assert result.clean
    gaps = [b - a for a, b in zip(source.starts, source.starts[1:])]
    assert gaps == pytest.approx([0.5, 1.0, 2.0, 3.0, 3.0])
    assert sample(registry, "flows_actor_restarts_total", FLOW, "crashy") == 5
    assert sample(registry, "flows_errors_total", FLOW, "crashy", error_type="RuntimeError") == 5
    assert sample(registry, "flows_actor_up", FLOW, "crashy") == 0  # it finished


async def test_a_zero_backoff_still_backs_off_after_the_first_restart(registry, autojump_clock):
    source = Crashing(3)
    flow = Flow(FLOW, sources=[source], sinks=[ListSink()],
                supervision=Supervision(max_restarts=10, backoff=0.0, max_backoff=1.0))
    await runtime(flow, registry).run()
    gaps = [b - a for a, b in zip(source.starts, source.starts[1:])]
    assert gaps == pytest.approx([0.0, 0.01, 0.02])


async def test_the_backoff_starts_over_after_a_healthy_window(registry, autojump_clock):
    # crashes at once, at once, then after 100 s of health (window 60), then at once
    source = Crashing(4, gaps=[0.0, 0.0, 100.0])
    flow = Flow(FLOW, sources=[source], sinks=[ListSink()],
                supervision=Supervision(max_restarts=2, window=60.0, backoff=1.0, max_backoff=8.0))
    result = await runtime(flow, registry).run()
    assert result.clean  # 4 crashes, but never more than 2 restarts within 60 s
    gaps = [b - a for a, b in zip(source.starts, source.starts[1:])]
    assert gaps == pytest.approx([1.0, 2.0, 101.0, 2.0])


async def test_the_budget_counts_crashes_within_the_window_only(registry, autojump_clock):
    source = Crashing(10)
    flow = Flow(FLOW, sources=[source], sinks=[ListSink()],
                supervision=Supervision(max_restarts=2, window=60.0, backoff=1.0, max_backoff=1.0))
    rt = runtime(flow, registry)
    with pytest.raises(FlowFailed) as info:
        await rt.run()
    assert str(info.value) == (
        "flow 'core': source 'crashy' failed 3 times within 60s (restart budget 2); "
        "last error: RuntimeError: boom 3"
    )
    assert len(source.starts) == 3
    assert rt.state == "stopped"
    slot = next(s for s in rt.status()["actors"] if s["name"] == "crashy")
    assert slot["restarts"] == 2


async def test_a_finite_flow_ends_clean_and_exhausted(registry, autojump_clock):
    sink = ListSink()
    rt = runtime(Flow(FLOW, sources=[ListSource([ticks(2), ticks(3, 2)])], sinks=[sink]), registry)
    t0 = time.monotonic()
    result = await rt.run()
    assert (result.clean, result.reason) == (True, "exhausted")
    assert 0.0 <= result.seconds <= time.monotonic() - t0
    assert len(sink.records) == 5
    assert rt.totals() == "list: in=0 out=5 dropped=0; collect: in=5 out=0 dropped=0"


async def test_a_duration_stops_an_endless_flow_cleanly(registry, autojump_clock):
    source = Crashing(0)

    class Endless:
        name = "endless"

        async def run(self, outbox):
            while True:  # not a wait: an endless source
                await outbox.send(Batch(ticks(1)))
                await trio.sleep(1.0)

    rt = runtime(Flow(FLOW, sources=[Endless()], sinks=[ListSink()]), registry, duration=5.0)
    result = await rt.run()
    assert (result.clean, result.reason) == (True, "duration")
    assert trio.current_time() == pytest.approx(5.0, abs=0.01) or trio.current_time() >= 5.0
    del source


async def test_a_second_stop_while_draining_forces_the_stop(registry, autojump_clock):
    sink = GatedSink()
    rt = runtime(Flow(FLOW, sources=[ListSource([ticks(2)])], sinks=[sink]), registry,
                 drain_timeout=math.inf)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.sleep(1.0)
        rt.stop("first")
        assert rt.state == "draining" and rt.stop_reason == "first"
        assert rt.ready() == (False, ["flow is draining"])
        await trio.sleep(1000.0)  # no drain deadline: still draining
        assert rt.state == "draining"
        rt.stop("second")
    assert rt.stop_reason == "first"
    assert sample(registry, "flows_records_discarded_total", FLOW, "gated", reason="forced_stop") == 2


async def test_a_stopped_flow_ignores_more_stops(registry, autojump_clock):
    rt = runtime(Flow(FLOW, sources=[ListSource([ticks(1)])], sinks=[ListSink()]), registry)
    result = await rt.run()
    rt.stop()  # after the end: nothing to do
    rt.stop()
    assert result.clean and rt.state == "stopped"


async def test_readiness_names_what_is_not_running_and_unhealthy(registry, autojump_clock):
    class Unhealthy(GatedSink):
        def health(self):
            return "sink gated: database away"

    sink = Unhealthy()
    rt = runtime(Flow(FLOW, sources=[ListSource([ticks(1)])], sinks=[sink]), registry)
    assert rt.ready() == (False, [
        "flow is starting", "source list is starting", "sink gated is starting",
        "sink gated: database away",
    ])
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.sleep(1.0)
        assert rt.ready() == (False, ["sink gated: database away"])
        sink.gate.set()


async def test_totals_show_written_and_lost_records(registry, autojump_clock):
    from flows import BatchingSink

    class Hanging(BatchingSink):
        def __init__(self):
            super().__init__(name="db", batch_size=2, flush_interval=1000.0)
            self.calls = 0

        async def write(self, records):
            self.calls += 1
            if self.calls > 1:
                await trio.sleep_forever()

    class Waiting(ListSource):
        async def run(self, outbox):
            await super().run(outbox)
            await trio.sleep_forever()

    sink = Hanging()
    rt = runtime(Flow(FLOW, sources=[Waiting([ticks(2), ticks(2, 2), ticks(3, 4)])],
                      sinks=[sink]), registry, drain_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(100):
            while sink.calls < 2:
                await trio.sleep(0.1)
        rt.stop()
    assert rt.totals() == "list: in=0 out=7 dropped=0; db: in=4 out=0 dropped=5 written=2 lost=5"  # 3 still queued


def test_runtime_takes_only_a_flow_and_checks_its_address():
    with pytest.raises(FlowError, match="expected a Flow, got list"):
        Runtime([])  # type: ignore[arg-type]
    flow = Flow(FLOW, sources=[ListSource([])], sinks=[ListSink()])
    for off in (None, "", "0"):
        assert Runtime(flow, metrics_addr=off).metrics_addr is None
    assert Runtime(flow, metrics_addr="127.0.0.1:0").metrics_addr == "127.0.0.1:0"


async def test_the_flow_reads_failed_while_it_shuts_down_after_its_budget(registry, autojump_clock):
    from flows import BatchingSink

    seen: list[str] = []

    class Watching(BatchingSink):
        async def write(self, records):
            pass

        async def close(self):
            seen.append(rt.state)  # what /readyz says while the flow shuts down

    source = Crashing(10)
    flow = Flow(FLOW, sources=[source], sinks=[Watching(name="watch")],
                supervision=Supervision(max_restarts=0))
    rt = runtime(flow, registry)
    with pytest.raises(FlowFailed):
        await rt.run()
    assert seen == ["failed"]
    assert rt.state == "stopped"


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
async def test_a_signal_drains_the_flow(registry, signum):
    import os
    import signal

    class Endless:
        name = "endless"

        async def run(self, outbox):
            while True:  # not a wait: an endless source
                await outbox.send(Batch(ticks(1)))
                await trio.sleep(0.01)

    rt = runtime(Flow(FLOW, sources=[Endless()], sinks=[ListSink()]), registry, handle_signals=True)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await trio.testing.wait_all_tasks_blocked()
            os.kill(os.getpid(), getattr(signal, signum))
    assert rt.stop_reason == f"signal {signum}"


async def test_status_shows_each_edges_send_wait_to_the_microsecond(registry):
    sink = GatedSink()

    async def opener():
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(0.05)  # real time: send-wait is wall-clock
        sink.gate.set()

    flow = Flow(FLOW, sources=[ListSource([ticks(1), ticks(1, 1), ticks(1, 2)])], sinks=[sink],
                capacity=1)
    rt = runtime(flow, registry)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(opener)
            await rt.run()
    (edge,) = rt.status()["edges"]
    waited = edge["send_wait_seconds"]
    assert waited >= 0.04
    assert waited == round(waited, 6) and waited == round(rt.links[0].outbox.waits[0], 6)
    assert edge["buffer"] == {"used": 0, "capacity": 1}


async def test_readiness_names_a_stale_source(registry, autojump_clock):
    class Silent:
        name = "silent"
        stale_after = 5.0

        async def run(self, outbox):
            await trio.sleep_forever()

    rt = runtime(Flow(FLOW, sources=[Silent()], sinks=[ListSink()]), registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await trio.sleep(4.0)
        assert rt.ready() == (True, [])
        await trio.sleep(2.0)
        assert rt.ready() == (False, [
            "source silent: stale (no valid record yet for 6s, stale_after 5s)"])
        rt.stop()
