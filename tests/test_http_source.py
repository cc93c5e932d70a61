"""The HTTP source base (flows.HttpSource) against a scripted server: how
each kind of answer moves the circuit breaker, the pause and the counters."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from _http_sources import OK, Probe, http, serve_answers
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, Runtime
from flows.testing import ListSink, sample


async def scripted(nursery, script: list[tuple], then=OK) -> tuple[str, list[float]]:
    """A server answering ``script`` in turn, then ``then``; also returns the
    list of trio times at which requests arrived."""
    times: list[float] = []

    def answer(head: bytes):
        times.append(trio.current_time())
        return script.pop(0) if script else then

    return await serve_answers(nursery, answer, lambda head: None), times


async def test_a_half_open_probe_answered_429_settles_the_breaker(nursery, autojump_clock):
    url, times = await scripted(nursery, [http(500), http(500), http(429, retry_after=3)])
    source = Probe(base_url=url, every=1.0, retries=0,
                   circuit=CircuitBreaker(failures=2, reset_after=5.0))
    sink, registry = ListSink(), CollectorRegistry()
    rt = Runtime(Flow("ho", sources=[source], sinks=[sink]), registry=registry, metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(60):
            while source.circuit.state != "open":
                await trio.sleep(0.1)
            assert "source probe: circuit open" in rt.ready()[1]
            while len(times) < 3:  # the probe, answered 429 Retry-After: 3
                await trio.sleep(0.1)
            await trio.sleep(0.1)
            assert source.circuit.state == "closed"  # the API answered: settled
            while not sink.records:
                await trio.sleep(0.1)
        assert times[3] - times[2] >= 3  # the pause was kept
        assert sample(registry, "flows_source_circuit_state", "ho", "probe") == 0
        assert rt.ready()[0]
        rt.stop()


async def test_half_open_shows_in_health_and_the_state_gauge(nursery, autojump_clock):
    gate = trio.Event()
    url, _times = await scripted(nursery, [http(500), http(500)])
    source = Probe(base_url=url, every=1.0, retries=0, read_timeout=1000.0,
                   circuit=CircuitBreaker(failures=2, reset_after=5.0))
    registry = CollectorRegistry()
    rt = Runtime(Flow("hs", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    original = source._get

    async def slow_probe(*args):  # the probe hangs until the test has looked
        if source.circuit.state == "half_open":
            await gate.wait()
        return await original(*args)

    source._get = slow_probe
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(60):
            while source.circuit.state != "half_open":
                await trio.sleep(0.1)
            await trio.testing.wait_all_tasks_blocked()
        assert "source probe: circuit half-open (probing)" in rt.ready()[1]
        assert sample(registry, "flows_source_circuit_state", "hs", "probe") == 1
        gate.set()
        with trio.fail_after(60):
            while source.circuit.state != "closed":
                await trio.sleep(0.1)
        rt.stop()


def test_a_cancelled_probe_lets_the_next_one_through():
    async def main():
        breaker = CircuitBreaker(failures=1, reset_after=1.0)
        breaker.failure()
        await trio.sleep(1.0)
        assert breaker.allow() and breaker.state == "half_open"
        assert not breaker.allow()  # one probe at a time
        breaker.release()
        assert breaker.allow()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize(("failures", "script", "state"), [
    (3, [http(500), http(500), OK, http(500), http(500)], "closed"),  # a success resets the count
    (3, [http(500), http(500), http(500)], "open"),
    (2, [http(500), http(429, 1), http(500)], "open"),  # a 429 neither counts nor resets
])
async def test_failures_in_a_row_open_the_circuit(nursery, autojump_clock, failures, script, state):
    url, times = await scripted(nursery, list(script))
    source = Probe(base_url=url, every=1.0, retries=0,
                   circuit=CircuitBreaker(failures=failures, reset_after=1000.0))
    rt = Runtime(Flow("fr", sources=[source], sinks=[ListSink()]), registry=CollectorRegistry(),
                 metrics_addr=None)
    async with trio.open_nursery() as inner:
        await inner.start(rt.run)
        with trio.fail_after(100):
            while len(times) < len(script) and source.circuit.state == "closed":
                await trio.sleep(0.1)
            await trio.sleep(0.5)
        assert source.circuit.state == state
        rt.stop()
