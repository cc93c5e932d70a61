"""BatchingSink behaviour that mutation testing found unpinned (issue 20):
the size of every flush, ``batch_size=1``, the flush deadline, the write
metrics' values, give-up and fatal paths, ``close()`` after a forced stop,
``health()``. (The ``Retry`` backoff schedule is tested with ``Retry``.)"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio
import trio.testing

from flows import Batch, BatchingSink, Edge, Flow, Retry, Runtime, Tick
from flows.testing import sample

FLOW = "core"


def ticks(n: int, offset: int = 0) -> list[Tick]:
    return [Tick("t", f"S{i}", 10.0 + i, float(i)) for i in range(offset, offset + n)]


class ScriptSource:
    """Sends batches per ``plan``: a list of record counts, or ("sleep", s)."""

    name = "src"

    def __init__(self, plan: list[Any], *, created_ago: float = 0.0, then_wait: bool = False) -> None:
        self.plan, self.created_ago, self.then_wait = plan, created_ago, then_wait
        self.acks: dict[int, list[str]] = {}

    async def run(self, outbox: Any) -> None:
        sent = 0
        for step in self.plan:
            if isinstance(step, tuple):
                await trio.sleep(step[1])
                continue
            hook = lambda outcome, i=len(self.acks): self.acks.setdefault(i, []).append(outcome)  # noqa: B008 (binds the index now)
            self.acks.setdefault(len(self.acks), [])
            await outbox.send(Batch(ticks(step, sent), acks=[hook],
                                    created=time.monotonic() - self.created_ago))
            sent += step
        if self.then_wait:
            await trio.sleep_forever()

    def outcomes(self) -> list[list[str]]:
        return [self.acks[i] for i in sorted(self.acks)]


class MemorySink(BatchingSink):
    """Keeps each write's records and its trio time; ``fail`` says what the
    n-th write attempt (from 0) raises, if anything."""

    def __init__(self, fail: dict[int, Exception] | None = None, **options: Any) -> None:
        options.setdefault("name", "mem")
        super().__init__(**options)
        self.writes: list[list[Tick]] = []
        self.times: list[float] = []
        self.fail = fail or {}
        self.attempts = 0
        self.opened = self.closed = 0
        self.fatal: type[Exception] | None = None

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        await trio.sleep(0.5)  # a close that takes a moment (mock clock)
        self.closed += 1

    async def write(self, records: list[Any]) -> None:
        attempt, self.attempts = self.attempts, self.attempts + 1
        if attempt in self.fail:
            raise self.fail[attempt]
        self.writes.append(list(records))
        self.times.append(trio.current_time())

    def is_fatal(self, exc: Exception) -> bool:
        return self.fatal is not None and isinstance(exc, self.fatal)


async def run(sink: BatchingSink, source: ScriptSource, registry, **options: Any):
    flow = Flow(FLOW, sources=[source], sinks=[sink], edges={sink.name: Edge(capacity=64)})
    with trio.fail_after(600):  # mock clock: a hang fails at once
        return await Runtime(flow, registry=registry, metrics_addr=None, **options).run()


def value(registry, name: str, **labels: str) -> float:
    return sample(registry, name, FLOW, "mem", **labels)


async def test_every_flush_holds_batch_size_records_or_more(registry, autojump_clock):
    sink = MemorySink(batch_size=3, flush_interval=1000.0)
    await run(sink, ScriptSource([1] * 7), registry)
    assert [len(w) for w in sink.writes] == [3, 3, 1]  # the rest when the inbox ends
    assert [t.symbol for w in sink.writes for t in w] == [f"S{i}" for i in range(7)]


async def test_a_batch_that_crosses_batch_size_is_written_whole(registry, autojump_clock):
    sink = MemorySink(batch_size=3, flush_interval=1000.0)
    await run(sink, ScriptSource([2, 2, 2, 2]), registry)
    assert [len(w) for w in sink.writes] == [4, 4]


async def test_batch_size_one_writes_every_batch_alone(registry, autojump_clock):
    sink = MemorySink(batch_size=1, flush_interval=1000.0)
    source = ScriptSource([1, 1, 1])
    await run(sink, source, registry)
    assert [len(w) for w in sink.writes] == [1, 1, 1]
    assert source.outcomes() == [["written"]] * 3


async def test_the_flush_deadline_runs_from_the_first_pending_batch(registry, autojump_clock):
    sink = MemorySink(batch_size=100, flush_interval=1.0)
    source = ScriptSource([1, ("sleep", 0.5), 1, ("sleep", 2.0), 1], then_wait=True)
    flow = Flow(FLOW, sources=[source], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(rt.run)
        with trio.fail_after(100):
            while len(sink.writes) < 2:
                await trio.sleep(0.1)
        rt.stop()
    assert [len(w) for w in sink.writes[:2]] == [2, 1]
    assert sink.times[0] - t0 == pytest.approx(1.0, abs=0.01)  # not 1.5: the second batch waits
    assert sink.times[1] - t0 == pytest.approx(3.5, abs=0.01)  # its own deadline


async def test_write_metrics_count_writes_records_and_latency(registry, autojump_clock):
    sink = MemorySink(batch_size=2, flush_interval=1000.0)
    await run(sink, ScriptSource([2, 2, 1], created_ago=30.0), registry)
    assert value(registry, "flows_sink_write_seconds_count") == 3
    assert 0.0 <= value(registry, "flows_sink_write_seconds_sum") < 5.0
    assert value(registry, "flows_sink_batch_records_count") == 3
    assert value(registry, "flows_sink_batch_records_sum") == 5
    # one end-to-end observation per batch, from the source's creation time
    assert value(registry, "flows_end_to_end_latency_seconds_count") == 3
    assert 90.0 <= value(registry, "flows_end_to_end_latency_seconds_sum") < 120.0


async def test_write_seconds_measure_the_write(registry):  # real clock: a thread sleeps
    class SlowSink(MemorySink):
        async def write(self, records):
            await trio.to_thread.run_sync(time.sleep, 0.05)  # real time
            await super().write(records)

    sink = SlowSink(batch_size=1, flush_interval=1000.0)
    await run(sink, ScriptSource([1, 1]), registry)
    assert value(registry, "flows_sink_write_seconds_count") == 2
    assert value(registry, "flows_sink_write_seconds_sum") >= 0.1


async def test_a_transient_failure_is_retried_and_counted(registry, autojump_clock):
    sink = MemorySink({0: ConnectionRefusedError("down")}, batch_size=2, flush_interval=1000.0)
    source = ScriptSource([2])
    await run(sink, source, registry)
    assert [len(w) for w in sink.writes] == [2]
    assert source.outcomes() == [["written"]]
    assert value(registry, "flows_sink_write_errors_total") == 1
    assert value(registry, "flows_sink_retries_total") == 1
    assert value(registry, "flows_errors_total", error_type="ConnectionRefusedError") == 1
    assert value(registry, "flows_records_discarded_total", reason="write_failed") == 0


async def test_a_write_that_outlasts_a_finite_retry_policy_is_dropped_and_the_sink_goes_on(
    registry, autojump_clock
):
    down = {i: ConnectionRefusedError("down") for i in range(3)}
    sink = MemorySink(down, batch_size=2, flush_interval=1000.0,
                      retry=Retry(attempts=3, backoff=0.1, max_backoff=0.1))
    source = ScriptSource([2, ("sleep", 1.0), 2])
    result = await run(sink, source, registry)
    assert result.clean
    assert sink.attempts == 4  # 3 attempts for the first write, 1 for the second
    assert [[t.symbol for t in w] for w in sink.writes] == [["S2", "S3"]]
    assert source.outcomes() == [["failed"], ["written"]]
    assert value(registry, "flows_records_discarded_total", reason="write_failed") == 2
    assert value(registry, "flows_sink_retries_total") == 2
    assert value(registry, "flows_sink_write_errors_total") == 3


async def test_records_the_database_refuses_are_isolated_and_dropped_alone(registry, autojump_clock):
    class Picky(MemorySink):
        async def write(self, records):
            self.attempts += 1
            if any(t.symbol in ("S1", "S4") for t in records):
                raise ValueError("refused")
            self.writes.append(list(records))

    sink = Picky(batch_size=6, flush_interval=1000.0)
    source = ScriptSource([3, 3])
    await run(sink, source, registry)
    assert sorted(t.symbol for w in sink.writes for t in w) == ["S0", "S2", "S3", "S5"]
    assert value(registry, "flows_records_discarded_total", reason="rejected") == 2
    assert value(registry, "flows_sink_retries_total") == 0  # not worth retrying
    assert source.outcomes() == [["written"], ["written"]]


async def test_a_write_given_up_midway_counts_only_the_records_not_yet_settled(
    registry, autojump_clock
):
    """S1 is refused and isolated (S0 written, S1 rejected: 2 settled); then
    the database goes down for good while S2 and S3 are written: those two,
    and only those, are counted write_failed."""
    class RefusesThenDown(MemorySink):
        async def write(self, records):
            self.attempts += 1
            if any(t.symbol == "S1" for t in records):
                raise ValueError("refused")
            if any(t.symbol == "S2" for t in records):
                raise ConnectionRefusedError("down")
            self.writes.append(list(records))

    sink = RefusesThenDown(batch_size=4, flush_interval=1000.0,
                           retry=Retry(attempts=2, backoff=0.1, max_backoff=0.1))
    source = ScriptSource([4])
    await run(sink, source, registry)
    assert [[t.symbol for t in w] for w in sink.writes] == [["S0"]]
    assert value(registry, "flows_records_discarded_total", reason="rejected") == 1
    assert value(registry, "flows_records_discarded_total", reason="write_failed") == 2
    assert source.outcomes() == [["failed"]]


async def test_a_fatal_error_drops_the_write_and_fails_the_sink(registry, autojump_clock):
    from flows import FlowFailed, Supervision

    sink = MemorySink({i: PermissionError("no") for i in range(10)}, batch_size=2,
                      flush_interval=1000.0)
    sink.fatal = PermissionError
    source = ScriptSource([2])
    flow = Flow(FLOW, sources=[source], sinks=[sink],
                supervision=Supervision(max_restarts=0))
    with pytest.raises(FlowFailed, match="PermissionError"):
        with trio.fail_after(600):
            await Runtime(flow, registry=registry, metrics_addr=None).run()
    assert sink.attempts == 1  # not retried
    assert source.outcomes() == [["failed"]]
    assert value(registry, "flows_records_discarded_total", reason="write_failed") == 2
    assert value(registry, "flows_sink_retries_total") == 0


async def test_close_runs_to_its_end_after_a_forced_stop(registry, autojump_clock):
    class Hanging(MemorySink):
        async def write(self, records):
            await trio.sleep_forever()

    sink = Hanging(batch_size=1, flush_interval=1000.0)
    source = ScriptSource([1], then_wait=True)
    flow = Flow(FLOW, sources=[source], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None, drain_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(100):
            while sink.opened == 0 or value(registry, "flows_records_received_total") < 1:
                await trio.sleep(0.1)
        rt.stop()
    assert sink.closed == 1  # close() slept (0.5 s) through the cancellation: shielded
    assert source.outcomes() == [["failed"]]
    assert value(registry, "flows_records_discarded_total", reason="forced_stop") == 1


async def test_health_says_how_long_a_write_has_been_failing(registry, autojump_clock):
    down = {i: ConnectionRefusedError("down") for i in range(1000)}
    sink = MemorySink(down, batch_size=1, flush_interval=1000.0, unready_after=5.0,
                      retry=Retry(backoff=1.0, max_backoff=1.0))
    source = ScriptSource([1], then_wait=True)
    flow = Flow(FLOW, sources=[source], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None, drain_timeout=1.0)
    assert sink.health() is None
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(100):
            while sink.attempts == 0:
                await trio.sleep(0.1)
        t0 = trio.current_time()
        await trio.sleep_until(t0 + 4.0)
        assert sink.health() is None  # not yet unready_after
        await trio.sleep_until(t0 + 6.0)
        problem = sink.health()
        assert problem is not None
        assert problem.startswith("sink mem: a write of 1 records has been failing (")
        assert "failed attempts; last error: ConnectionRefusedError: down)" in problem
        assert not rt.ready()[0]
        rt.stop()
    assert sink.health() is None  # the write is over


async def test_health_says_a_write_is_in_progress(registry, autojump_clock):
    gate = trio.Event()

    class Slow(MemorySink):
        async def write(self, records):
            await gate.wait()
            await super().write(records)

    sink = Slow(batch_size=1, flush_interval=1000.0, unready_after=2.0)
    source = ScriptSource([1, 1])
    flow = Flow(FLOW, sources=[source], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(rt.run)
        with trio.fail_after(100):
            while value(registry, "flows_records_received_total") < 1:
                await trio.sleep(0.1)
        await trio.sleep(2.2)
        assert sink.health() == "sink mem: a write of 1 records has been in progress for 2s"
        gate.set()
    assert sink.health() is None
    assert len(sink.writes) == 2


async def test_health_turns_at_exactly_unready_after(registry, autojump_clock):
    class Stuck(MemorySink):
        started: float | None = None

        async def write(self, records):
            self.started = trio.current_time()
            await trio.sleep_forever()

    sink = Stuck(batch_size=1, flush_interval=1000.0, unready_after=3.0)
    # (not at trio time 0: "since" must be a difference of times)
    flow = Flow(FLOW, sources=[ScriptSource([("sleep", 10.0), 1], then_wait=True)], sinks=[sink])
    rt = Runtime(flow, registry=registry, metrics_addr=None, drain_timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with trio.fail_after(100):
            while sink.started is None:
                await trio.sleep(0.1)
        await trio.sleep_until(sink.started + 2.999)
        assert sink.health() is None
        await trio.sleep_until(sink.started + 3.0)
        assert sink.health() == "sink mem: a write of 1 records has been in progress for 3s"
        rt.stop()


@pytest.mark.parametrize(
    "options",
    [{"batch_size": 0}, {"flush_interval": 0.0}, {"write_timeout": 0.0},
     {"unready_after": 0.0}, {"flush_interval": -1.0}],
)
def test_bad_options_are_refused(options):
    with pytest.raises(ValueError):
        MemorySink(**options)


def test_good_options_are_kept():
    sink = MemorySink(batch_size=1, flush_interval=0.01, write_timeout=None, unready_after=0.01)
    assert (sink.batch_size, sink.flush_interval, sink.write_timeout, sink.unready_after) == (
        1, 0.01, None, 0.01)
    assert sink.retry == Retry()


async def test_a_write_that_finished_is_never_aborted_later(registry):
    """Two sinks' writes overlap; the later one ends first. Neither may be
    aborted when its (wall-clock) write timeout would have come."""
    a_started, b_done = trio.Event(), trio.Event()

    class Counting(MemorySink):
        aborts = 0

        def abort(self):
            self.aborts += 1

        async def close(self):
            pass  # (MemorySink's close takes longer than this write_timeout)

    class A(Counting):
        async def write(self, records):
            a_started.set()
            await b_done.wait()
            await super().write(records)

    class B(Counting):
        async def run(self, inbox):
            await a_started.wait()  # B's write starts (and its timer is set) after A's
            await super().run(inbox)

        async def write(self, records):
            await super().write(records)
            b_done.set()

    a = A(name="a", batch_size=1, flush_interval=1000.0, write_timeout=0.3)
    b = B(name="b", batch_size=1, flush_interval=1000.0, write_timeout=0.3)
    flow = Flow(FLOW, sources=[ScriptSource([1])], sinks=[a, b])
    with trio.fail_after(20):
        await Runtime(flow, registry=registry, metrics_addr=None).run()
        await trio.sleep(0.6)  # real time: past both timeouts
    assert len(a.writes) == 1 and len(b.writes) == 1
    assert (a.aborts, b.aborts) == (0, 0)
