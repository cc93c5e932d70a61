"""Testing helpers for flows and for people writing components (like trio.testing).

- ``assert_component_metrics``: the one compliance check every component's
  test calls: did the component move its core metrics?
- ``ListSource``, ``ListSink``, ``GatedSink``: small actors for tests.
- ``run_briefly``: run a flow to completion in a test, with a fresh registry.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from .._channels import Inbox, Outbox
from .._flow import Flow
from .._records import Batch
from .._runtime import RunResult, Runtime

__all__ = [
    "GatedSink",
    "ListSink",
    "ListSource",
    "assert_component_metrics",
    "deadline",
    "run_briefly",
    "running_source",
    "sample",
    "wait_until",
]


def sample(registry: CollectorRegistry, name: str, flow: str, stage: str, **labels: str) -> float:
    """A sample's value, 0.0 when absent."""
    value = registry.get_sample_value(name, {"flow": flow, "stage": stage, **labels})
    return 0.0 if value is None else value


_CORE = {
    "source": (
        "flows_records_sent_total",
        "flows_batch_processing_seconds_count",
        "flows_send_wait_seconds_count",
        "flows_source_lag_seconds_count",
    ),
    "stage": (
        "flows_records_received_total",
        "flows_batch_processing_seconds_count",
    ),
    "sink": (
        "flows_records_received_total",
        "flows_batch_processing_seconds_count",
        "flows_end_to_end_latency_seconds_count",
    ),
}
_ALWAYS = (
    "flows_records_sent_total",
    "flows_records_received_total",
    "flows_actor_restarts_total",
    "flows_actor_up",
    "flows_utilization_ratio",
)


def assert_component_metrics(
    registry: CollectorRegistry, flow: str, stage: str, kind: str, *, sent: bool | None = None
) -> dict[str, float]:
    """Assert that component ``stage`` of ``flow`` emitted its core metrics.

    ``kind`` is ``source``, ``stage`` or ``sink``. Every component must
    export the core series, and the ones that count its work must have
    moved: records sent (sources), received (stages, sinks), batch
    processing time, send-wait (sources and, when ``sent``, stages), source
    lag, sink end-to-end latency. Returns the values read, by name.
    """
    if kind not in _CORE:
        raise ValueError(f"kind must be one of {sorted(_CORE)}")
    values = {}
    for name in _ALWAYS:
        value = registry.get_sample_value(name, {"flow": flow, "stage": stage})
        assert value is not None, f"{kind} {stage!r}: {name} is not exported"
        values[name] = value
    moved = list(_CORE[kind])
    if kind == "stage" and sent is not False:
        moved += ["flows_records_sent_total", "flows_send_wait_seconds_count"]
    for name in moved:
        value = sample(registry, name, flow, stage)
        assert value > 0, f"{kind} {stage!r}: {name} did not move (is {value})"
        values[name] = value
    return values


class ListSource:
    """Source: sends the given batches (lists of records), then ends."""

    def __init__(self, batches: Iterable[Sequence[Any]], *, name: str = "list") -> None:
        self.batches = [list(b) for b in batches]
        self.name = name
        self.sent = 0

    async def run(self, outbox: Outbox) -> None:
        while self.sent < len(self.batches):
            with outbox.metrics.timed_batch():
                batch = Batch(self.batches[self.sent])
            await outbox.send(batch)
            self.sent += 1


class ListSink:
    """Sink: keeps every record it receives in ``records``."""

    def __init__(self, *, name: str = "collect") -> None:
        self.name = name
        self.records: list[Any] = []
        self.batches = 0

    async def run(self, inbox: Inbox) -> None:
        async for batch in inbox:
            self.records.extend(batch.records)
            self.batches += 1
            inbox.metrics.end_to_end.observe(0.0)
            batch.ack("written")


class GatedSink(ListSink):
    """Sink that takes nothing until ``gate`` is set: a stalled consumer."""

    def __init__(self, *, name: str = "gated") -> None:
        super().__init__(name=name)
        self.gate = trio.Event()

    async def run(self, inbox: Inbox) -> None:
        await self.gate.wait()
        await super().run(inbox)


async def run_briefly(flow: Flow, **options: Any) -> tuple[RunResult, CollectorRegistry]:
    """Run a finite ``flow`` to its end with a fresh registry and no server."""
    registry = CollectorRegistry()
    options.setdefault("metrics_addr", None)
    result = await Runtime(flow, registry=registry, **options).run()
    return result, registry


@asynccontextmanager
async def running_source(
    source: Any, sink: Any = None, *, flow: str = "live", **flow_options: Any
) -> AsyncIterator[tuple[Runtime, Any, CollectorRegistry]]:
    """Run ``source`` -> ``sink`` (default: a ListSink) in the background
    with a fresh registry; stops (drains) the flow when the block ends."""
    registry = CollectorRegistry()
    sink = sink or ListSink()
    rt = Runtime(Flow(flow, sources=[source], sinks=[sink], **flow_options), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        yield rt, sink, registry
        rt.stop()


@contextmanager
def deadline(seconds: float, what: str) -> Iterator[None]:
    """``trio.fail_after(seconds)`` (trio's clock, so virtual under
    ``MockClock``) whose ``trio.TooSlowError`` says what was awaited."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise trio.TooSlowError(f"waited {seconds:g}s (trio's clock) for {what}") from None


async def wait_until(
    condition: Callable[[], bool], timeout: float = 60.0, poll: float = 0.05, *, what: str | None = None
) -> None:
    """Check ``condition`` every ``poll`` s (of trio's clock) until true; after
    ``timeout`` s raise ``trio.TooSlowError`` naming ``what`` was awaited
    (default: the condition's source line)."""
    with deadline(timeout, what or _described(condition)):
        while not condition():
            await trio.sleep(poll)


def _described(condition: Callable[[], bool]) -> str:
    try:
        text = " ".join(inspect.getsource(condition).split())
    except (OSError, TypeError):
        text = repr(condition)
    return text if len(text) <= 300 else text[:300] + "..."
