"""Prometheus metrics: one set of families per registry, cached children per component.

Every metric carries the labels ``flow`` and ``stage`` (the component's
name) plus, for a few, one label from a small fixed set (``reason``,
``error_type``). A symbol never becomes a label value.
"""

from __future__ import annotations

import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = [
    "METRICS",
    "ComponentMetrics",
    "FlowMetrics",
    "SlowThresholds",
    "metrics_for",
    "quantile",
]

FAST_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
LATENCY_BUCKETS = (
    1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip
SIZE_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000)

FS = ("flow", "stage")

# name -> (type, extra labels, help). The README's metrics reference and the
# metrics test are both checked against this table.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "flows_records_received_total": ("counter", (), "Records a component took from its inbox."),
    "flows_records_sent_total": ("counter", (), "Records a component sent downstream."),
    "flows_records_discarded_total": (
        "counter",
        ("reason",),
        "Records a component dropped, by reason (unchanged, invalid, evicted, error, ...).",
    ),
    "flows_errors_total": ("counter", ("error_type",), "Errors a component met, by type."),
    "flows_actor_restarts_total": ("counter", (), "Times the supervisor restarted an actor."),
    "flows_actor_up": ("gauge", (), "1 while the actor runs, 0 otherwise."),
    "flows_batch_processing_seconds": (
        "histogram",
        (),
        "Time a component spent on one batch (not counting waits on its inbox or outbox).",
    ),
    "flows_send_wait_seconds": (
        "histogram",
        (),
        "Time a send to the outbox blocked on a full channel (backpressure).",
    ),
    "flows_channel_buffer_batches": ("gauge", (), "Batches waiting in the component's inbox."),
    "flows_channel_capacity_batches": ("gauge", (), "Capacity of the component's inbox."),
    "flows_utilization_ratio": ("gauge", (), "Share of recent time the component was busy (0-1)."),
    "flows_end_to_end_latency_seconds": (
        "histogram",
        (),
        "At a sink: time from the source making a batch to the sink having written it.",
    ),
    "flows_source_lag_seconds": (
        "histogram",
        (),
        "At a source: time from the exchange timestamp to the batch being sent.",
    ),
    "flows_source_poll_cycle_seconds": (
        "histogram",
        (),
        "At a source: time to refresh the whole symbol set once.",
    ),
    "flows_sink_write_seconds": ("histogram", (), "At a sink: time one write took."),
    "flows_sink_batch_records": ("histogram", (), "At a sink: records per write."),
    "flows_sink_write_errors_total": ("counter", (), "At a sink: writes that failed."),
    "flows_sink_retries_total": ("counter", (), "At a sink: writes retried after a failure."),
    "flows_slow_batches_total": (
        "counter",
        ("severity",),
        "Batches whose processing crossed the slow threshold (warning, critical).",
    ),
    "flows_slow_poll_cycles_total": (
        "counter",
        ("severity",),
        "Source poll cycles that crossed the slow threshold (warning, critical).",
    ),
    "flows_source_request_seconds": (
        "histogram",
        ("endpoint",),
        "At an HTTP source: time one request took, by endpoint.",
    ),
    "flows_source_responses_total": (
        "counter",
        ("status_class",),
        "At an HTTP source: responses by status class (2xx, 4xx, 429, 5xx, error for no response).",
    ),
    "flows_source_retries_total": ("counter", (), "At an HTTP source: requests retried."),
    "flows_source_rate_limit_wait_seconds": (
        "histogram",
        (),
        "At an HTTP source: time a request waited for the rate limiter.",
    ),
    "flows_source_circuit_state": (
        "gauge",
        (),
        "At an HTTP source: circuit breaker state (0 closed, 1 half-open, 2 open).",
    ),
    "flows_source_messages_total": (
        "counter",
        (),
        "At a stream source: websocket messages received.",
    ),
    "flows_source_reconnects_total": (
        "counter",
        ("reason",),
        (
            "At a stream source: connections replaced, by reason (closed, error, silent, "
            "timeout, server)."
        ),
    ),
    "flows_source_connection_uptime_seconds": (
        "gauge",
        (),
        "At a stream source: seconds since the youngest connection opened (0 while one is down).",
    ),
    "flows_source_gaps_total": (
        "counter",
        (),
        "At a stream source: jumps in a symbol's update ids (lost updates).",
    ),
}

_BUCKETS = {
    "flows_batch_processing_seconds": FAST_BUCKETS,
    "flows_send_wait_seconds": FAST_BUCKETS,
    "flows_end_to_end_latency_seconds": LATENCY_BUCKETS,
    "flows_source_lag_seconds": LATENCY_BUCKETS,
    "flows_source_poll_cycle_seconds": LATENCY_BUCKETS,
    "flows_sink_write_seconds": FAST_BUCKETS,
    "flows_sink_batch_records": SIZE_BUCKETS,
    "flows_source_request_seconds": LATENCY_BUCKETS,
    "flows_source_rate_limit_wait_seconds": LATENCY_BUCKETS,
}

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}


class FlowMetrics:
    """All flows_ metric families registered on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.families: dict[str, Counter | Gauge | Histogram] = {}
        for name, (kind, extra, doc) in METRICS.items():
            if name in ("flows_channel_buffer_batches", "flows_channel_capacity_batches",
                        "flows_utilization_ratio"):
                continue  # served by the live collector below
            kwargs = {"buckets": _BUCKETS[name]} if kind == "histogram" else {}
            base = name.removesuffix("_total") if kind == "counter" else name
            self.families[name] = _KINDS[kind](
                base, doc, FS + extra, registry=registry, **kwargs
            )
        self.components: list[ComponentMetrics] = []
        registry.register(_LiveCollector(self))

    def component(self, flow: str, stage: str, kind: str) -> ComponentMetrics:
        """The metrics of one component (created on first use, then shared)."""
        for c in self.components:
            if c.flow == flow and c.stage == stage:
                return c
        c = ComponentMetrics(self, flow, stage, kind)
        self.components.append(c)
        return c


_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, FlowMetrics] = (
    weakref.WeakKeyDictionary()
)


def metrics_for(registry: CollectorRegistry) -> FlowMetrics:
    """The FlowMetrics of ``registry``, registering the families on first use."""
    fm = _by_registry.get(registry)
    if fm is None:
        fm = _by_registry[registry] = FlowMetrics(registry)
    return fm


@attrs.frozen(kw_only=True)
class SlowThresholds:
    """When a batch or a poll cycle counts as slow: (warning, critical) seconds.

    Each crossing is counted; a log line is written at most once per
    ``cooldown`` seconds per component and kind of operation.
    """

    batch: tuple[float, float] = (1.0, 5.0)
    cycle: tuple[float, float] = (30.0, 120.0)
    cooldown: float = 60.0


class ComponentMetrics:
    """Cached labelled children for one component; cheap to call per batch."""

    def __init__(self, fm: FlowMetrics, flow: str, stage: str, kind: str) -> None:
        self.flow_metrics = fm
        self.flow, self.stage, self.kind = flow, stage, kind
        f = fm.families
        child = lambda name: f[name].labels(flow, stage)
        self.received = child("flows_records_received_total")
        self.sent = child("flows_records_sent_total")
        self.restarts = child("flows_actor_restarts_total")
        self.up = child("flows_actor_up")
        self.processing = child("flows_batch_processing_seconds")
        self.send_wait = child("flows_send_wait_seconds")
        self.end_to_end = child("flows_end_to_end_latency_seconds")
        self.lag = child("flows_source_lag_seconds")
        self.poll_cycle = child("flows_source_poll_cycle_seconds")
        self.write_seconds = child("flows_sink_write_seconds")
        self.write_records = child("flows_sink_batch_records")
        self.write_errors = child("flows_sink_write_errors_total")
        self.write_retries = child("flows_sink_retries_total")
        self._labeled: dict[tuple[str, str | None], Any] = {}
        self.slow = SlowThresholds()
        self._slow_log_after: dict[str, float] = {}
        # Live figures read by the collector at scrape time.
        self.buffer: Callable[[], tuple[int, float]] | None = None
        self.pending: Callable[[], int] | None = None  # conflation buffer
        self.busy_seconds = 0.0
        self.wait_seconds = 0.0
        self._util_ref = (time.monotonic(), 0.0)
        self._util_value = 0.0

    def labeled(self, name: str, value: str | None = None) -> Any:
        """The child of family ``name`` for this component (and one extra
        label value, for families that have one); created on first use."""
        child = self._labeled.get((name, value))
        if child is None:
            values = (self.flow, self.stage) if value is None else (self.flow, self.stage, value)
            child = self._labeled[(name, value)] = self.flow_metrics.families[name].labels(*values)
        return child

    def discarded(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records dropped for ``reason`` (a small fixed word)."""
        self.labeled("flows_records_discarded_total", reason).inc(n)

    def error(self, error_type: str) -> None:
        """Count one error of ``error_type`` (a small fixed word or class name)."""
        self.labeled("flows_errors_total", error_type).inc()

    def observe_processing(self, seconds: float) -> None:
        self.busy_seconds += seconds
        self.processing.observe(seconds)
        if seconds >= self.slow.batch[0]:
            self._slow("flows_slow_batches_total", "batch", seconds, self.slow.batch)

    def observe_poll_cycle(self, seconds: float) -> None:
        """A source refreshed its whole symbol set in ``seconds``."""
        self.poll_cycle.observe(seconds)
        if seconds >= self.slow.cycle[0]:
            self._slow("flows_slow_poll_cycles_total", "poll cycle", seconds, self.slow.cycle)

    def _slow(self, metric: str, what: str, seconds: float, limits: tuple[float, float]) -> None:
        severity = "critical" if seconds >= limits[1] else "warning"
        self.labeled(metric, severity).inc()
        now = time.monotonic()
        if now >= self._slow_log_after.get(metric, 0.0):
            self._slow_log_after[metric] = now + self.slow.cooldown
            logging.getLogger("flows.slow").log(
                logging.ERROR if severity == "critical" else logging.WARNING,
                "flow %s: %s %s took %.3fs (%s threshold %.3fs)",
                self.flow, self.stage, what, seconds, severity,
                limits[1] if severity == "critical" else limits[0],
                extra={"flow": self.flow, "stage": self.stage, "severity": severity},
            )

    @contextmanager
    def timed_batch(self) -> Iterator[None]:
        """Time the body as one batch's processing."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe_processing(time.perf_counter() - t0)

    def utilization(self) -> float:
        """Busy share since the previous reading (at least one second ago)."""
        now = time.monotonic()
        t0, busy0 = self._util_ref
        if now - t0 >= 1.0:
            self._util_value = min(1.0, (self.busy_seconds - busy0) / (now - t0))
            self._util_ref = (now, self.busy_seconds)
        return self._util_value


class _LiveCollector:
    """Gauges computed at scrape time: buffer use and utilization."""

    def __init__(self, fm: FlowMetrics) -> None:
        self._fm = fm

    def describe(self):
        return []

    def collect(self):
        doc = {n: METRICS[n][2] for n in METRICS}
        used = GaugeMetricFamily(
            "flows_channel_buffer_batches", doc["flows_channel_buffer_batches"], labels=FS
        )
        cap = GaugeMetricFamily(
            "flows_channel_capacity_batches", doc["flows_channel_capacity_batches"], labels=FS
        )
        util = GaugeMetricFamily(
            "flows_utilization_ratio", doc["flows_utilization_ratio"], labels=FS
        )
        for c in list(self._fm.components):
            labels = [c.flow, c.stage]
            if c.buffer is not None:
                n, capacity = c.buffer()
                used.add_metric(labels, n)
                cap.add_metric(labels, capacity)
            util.add_metric(labels, c.utilization())
        yield from (used, cap, util)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Estimate quantile ``q`` from cumulative ``(upper_bound, count)`` pairs.

    Interpolates linearly inside a bucket, as PromQL's histogram_quantile
    does. Returns NaN when there are no observations.
    """
    if not buckets or buckets[-1][1] <= 0:
        return math.nan
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            if count == prev_count:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound
