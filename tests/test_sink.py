"""flows.BatchingSink (issue 17): forced stops lose nothing uncounted, writes are
bounded in time, a blocked sink makes the flow not ready, errors are sorted."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from flows import (
    Batch,
    BatchingSink,
    Edge,
    Flow,
    FlowFailed,
    Retry,
    Runtime,
    Supervision,
    Tick,
)
from flows.testing import ListSource, sample, wait_until


def ticks(n: int, offset: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i % 7}", 10.0 + i, float(i)) for i in range(offset, offset + n)]


class AckedSource:
    """Source: sends ``n`` batches of ``size`` records, each with an ack hook
    that records its outcomes (a batch must be acked exactly once)."""

    name = "acked"

    def __init__(self, n: int, size: int, *, then_wait: bool = False) -> None:
        self.batches = [ticks(size, i * size) for i in range(n)]
        self.outcomes: dict[int, list[str]] = {}
        self.then_wait = then_wait

    async def run(self, outbox) -> None:
        for i, records in enumerate(self.batches):
            hook = lambda outcome, i=i: self.outcomes.setdefault(i, []).append(outcome)
            with outbox.metrics.timed_batch():
                batch = Batch(records, acks=[hook])
            await outbox.send(batch)
        if self.then_wait:
            await trio.sleep_forever()  # an endless source, quiet after its batches


class ScriptedSink(BatchingSink):
    """A sink whose n-th write (from 0) does what ``script[n]`` says:
    "ok", "hang" (until ``release``), "fail" (OSError until ``release``)."""

    def __init__(self, script: list[str], **options) -> None:
        options.setdefault("name", "scripted")
        super().__init__(**options)
        self.script = script
        self.written: list[Tick] = []
        self.calls = 0
        self.release = trio.Event()
        self.started = trio.Event()

    async def write(self, records) -> None:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        if step != "ok":
            self.started.set()
        if step == "hang":
            await self.release.wait()
        elif step == "fail" and not self.release.is_set():
            raise ConnectionRefusedError("refused")
        self.written.extend(records)


def runtime(flow: Flow, registry, **options) -> Runtime:
    return Runtime(flow, registry=registry, metrics_addr=None, **options)


# -- fault 5: what a forced stop loses is counted ----------------------------------


async def test_a_forced_stop_counts_the_write_in_progress_and_the_queue(registry, autojump_clock):
    source = AckedSource(10, 5)
    sink = ScriptedSink(["ok", "hang"], batch_size=10, flush_interval=1000.0)
    flow = Flow("forced", sources=[source], sinks=[sink], edges={"scripted": Edge(capacity=2)})
    rt = runtime(flow, registry, drain_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await sink.started.wait()  # the second write hangs
        await trio.testing.wait_all_tasks_blocked()  # the inbox fills, the source blocks
        rt.stop()
    assert rt._forced
    sent = sample(registry, "flows_records_sent_total", "forced", "acked")
    lost = sample(registry, "flows_records_discarded_total", "forced", "scripted", reason="forced_stop")
    assert len(sink.written) == 10
    # 10 in the write in progress, 10 queued in the inbox (capacity 2 batches)
    assert lost == 20
    assert sent == len(sink.written) + lost
    # every batch that reached the sink is acked once: written, or failed (a
    # source may deliver it again); so is the one whose send the stop cut short
    assert all(len(v) == 1 for v in source.outcomes.values())
    assert sorted(v[0] for v in source.outcomes.values()) == ["failed"] * 5 + ["written"] * 2
    assert "scripted: in=20 out=0 dropped=20 written=10 lost=20" in rt.totals()


async def test_a_forced_stop_counts_what_the_sink_holds_in_its_buffer(registry, autojump_clock):
    from flows import stage

    passed = 0

    @stage
    async def stuck(batch):
        nonlocal passed
        if passed == 2:
            await trio.sleep_forever()  # a stage that never finishes its drain
        passed += 1
        return batch

    source = AckedSource(5, 4)
    sink = ScriptedSink(["ok"], batch_size=100, flush_interval=1000.0)
    rt = runtime(Flow("held", sources=[source], stages=[stuck], sinks=[sink]), registry,
                 drain_timeout=5.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await wait_until(lambda: sample(registry, "flows_records_received_total", "held",
                                        "scripted") == 8)
        rt.stop()
    assert sink.written == []  # never reached batch_size, and the drain did not end
    assert sample(registry, "flows_records_discarded_total", "held", "scripted",
                  reason="forced_stop") == 8
    assert [source.outcomes[i] for i in (0, 1)] == [["failed"], ["failed"]]
    assert "scripted: in=8 out=0 dropped=8 lost=8" in rt.totals()


# -- fault 2: a write in a thread that never returns cannot hold a forced stop ----------


class ThreadSink(BatchingSink):
    """Writes in a worker thread that blocks until ``unblock`` is set; abort()
    sets it (as a sink shutting its socket down would)."""

    def __init__(self, *, abort_works: bool = True, **options) -> None:
        options.setdefault("name", "thread")
        super().__init__(**options)
        self.unblock = threading.Event()
        self.blocking = threading.Event()
        self.aborts = 0
        self.abort_works = abort_works
        self.written: list[Tick] = []
        self.calls = 0

    def _write_sync(self, records) -> None:
        self.calls += 1
        if self.calls == 1:
            self.blocking.set()
            if not self.unblock.wait(30):
                raise AssertionError("never unblocked")
            if self.aborts:
                raise ConnectionResetError("the socket was shut down")
        self.written.extend(records)

    async def write(self, records) -> None:
        await self.run_in_thread(self._write_sync, records)

    def abort(self) -> None:
        self.aborts += 1
        if self.abort_works:
            self.unblock.set()


async def test_a_forced_stop_abandons_a_write_stuck_in_a_thread(registry, autojump_clock):
    sink = ThreadSink(abort_works=False, batch_size=5)
    safety = threading.Timer(10, sink.unblock.set)  # so the unfixed code ends, late
    safety.start()
    try:
        rt = runtime(Flow("stuck", sources=[ListSource([ticks(5), ticks(5, 5)])], sinks=[sink]),
                     registry, drain_timeout=5.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(rt.run)
            await trio.to_thread.run_sync(sink.blocking.wait)
            rt.stop()
        assert not sink.unblock.is_set(), "the run waited for the stuck thread"
    finally:
        sink.unblock.set()
        safety.cancel()
    assert rt._forced and sink.aborts >= 1
    assert sample(registry, "flows_records_discarded_total", "stuck", "thread",
                  reason="forced_stop") == 10


async def test_a_write_past_write_timeout_is_aborted_and_retried(registry):
    sink = ThreadSink(batch_size=10, write_timeout=0.2, retry=Retry(backoff=0.0))
    flow = Flow("slow", sources=[ListSource([ticks(10)])], sinks=[sink])
    with trio.fail_after(10):
        result = await runtime(flow, registry).run()
    assert result.clean
    assert sink.aborts >= 1 and len(sink.written) == 10
    assert sample(registry, "flows_errors_total", "slow", "thread", error_type="TimeoutError") == 1
    assert sample(registry, "flows_sink_retries_total", "slow", "thread") == 1
    assert sample(registry, "flows_records_discarded_total", "slow", "thread", reason="forced_stop") == 0


# -- fault 4: a sink that cannot write makes the flow not ready ---------------------


@pytest.mark.parametrize("step, state", [("hang", "in progress"), ("fail", "failing")])
async def test_a_blocked_sink_makes_the_flow_not_ready_until_it_recovers(
        registry, autojump_clock, step, state):
    sink = ScriptedSink(["ok", step], batch_size=5, unready_after=30.0,
                        retry=Retry(backoff=1.0, max_backoff=2.0))
    source = AckedSource(6, 5, then_wait=True)
    rt = runtime(Flow("ready", sources=[source], sinks=[sink]), registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        await sink.started.wait()
        t0 = trio.current_time()
        assert rt.ready() == (True, [])  # a short outage is not worth a flap
        await wait_until(lambda: not rt.ready()[0], timeout=60, poll=1.0)
        assert trio.current_time() - t0 >= 30.0
        _, reasons = rt.ready()
        assert len(reasons) == 1
        assert reasons[0].startswith(f"sink scripted: a write of 5 records has been {state}")
        if step == "fail":
            assert "last error: ConnectionRefusedError: refused" in reasons[0]
        sink.release.set()
        await wait_until(lambda: rt.ready()[0], timeout=60, poll=1.0)
        await wait_until(lambda: len(sink.written) == 30)
        assert rt.ready() == (True, [])
        rt.stop()
    assert {tuple(v) for v in source.outcomes.values()} == {("written",)}


# -- fault 3: the sink's own fault fails it; the records' fault drops them alone --------


class ConfigError(Exception):
    pass


class RefusingSink(BatchingSink):
    """Refuses records whose price is negative; fails on its configuration
    when ``misconfigured``."""

    def __init__(self, *, misconfigured: bool = False, **options) -> None:
        super().__init__(name="refusing", **options)
        self.misconfigured = misconfigured
        self.written: list[Tick] = []

    async def write(self, records) -> None:
        if self.misconfigured:
            raise ConfigError("bad credentials")
        if any(r.price < 0 for r in records):
            raise ValueError("negative price")
        self.written.extend(records)

    def is_fatal(self, exc: Exception) -> bool:
        return isinstance(exc, ConfigError)


async def test_bad_records_are_rejected_alone_and_the_sinks_own_fault_fails_it(registry):
    bad = Tick("t", "X" * 100_000, -1.0, 0.5)
    sink = RefusingSink(batch_size=100)
    await runtime(Flow("mixed", sources=[ListSource([ticks(10), [bad], ticks(10, 10)])],
                       sinks=[sink]), registry).run()
    assert sink.written == ticks(20)
    assert sample(registry, "flows_records_discarded_total", "mixed", "refusing", reason="rejected") == 1

    sink = RefusingSink(misconfigured=True)
    flow = Flow("conf", sources=[ListSource([ticks(3)])], sinks=[sink],
                supervision=Supervision(max_restarts=2, backoff=0.0))
    with trio.fail_after(10), pytest.raises(FlowFailed, match="ConfigError: bad credentials"):
        await runtime(flow, registry).run()
    assert sample(registry, "flows_records_discarded_total", "conf", "refusing", reason="write_failed") == 3
    assert sample(registry, "flows_sink_retries_total", "conf", "refusing") == 0


def test_rejects_bad_timeouts():
    with pytest.raises(ValueError, match="write_timeout"):
        ScriptedSink(["ok"], write_timeout=0)
    with pytest.raises(ValueError, match="unready_after"):
        ScriptedSink(["ok"], unready_after=0)


def test_the_watchdog_fires_what_is_due_and_forgets_what_is_cancelled():
    from flows._sink import _Watchdog

    dog = _Watchdog()
    fired = threading.Event()
    late = [dog.call_later(60.0, fired.set) for _ in range(2000)]
    dog.call_later(0.01, fired.set)
    for handle in late:
        dog.cancel(handle)
    assert fired.wait(10)
    assert len(dog._heap) < 1100  # cancelled entries do not pile up
