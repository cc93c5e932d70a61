"""Prometheus metrics: one set of families per registry, cached children per component.

Every metric carries the labels ``flow`` and ``stage`` (the component's
name) plus, for a few, one label from a small fixed set (``reason``,
``error_type``). A symbol never becomes a label value.

``METRICS`` holds the core families every component shares; they are
registered with the registry. A family only some components use is a
``MetricFamily`` the component declares (``METRICS`` class attribute),
registered on its first use through ``ComponentMetrics.labeled``.

The core families every batch moves (records received, sent and
discarded, batch processing, send-wait, source lag, end-to-end latency)
are ``FastFamily``s: their children count into plain attributes without a
lock (the trio thread updates them) and a collector turns them into the
same samples prometheus_client would (``_total``, ``_created``,
``_bucket``...) at scrape time. The others are prometheus_client's.
"""

from __future__ import annotations

import logging
import math
import re
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import metrics as _pm
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = [
    "FAST_BUCKETS",
    "LATENCY_BUCKETS",
    "METRICS",
    "SIZE_BUCKETS",
    "ComponentMetrics",
    "CounterChild",
    "FlowMetrics",
    "GaugeChild",
    "HistogramChild",
    "MetricFamily",
    "SlowThresholds",
    "declared_metrics",
    "histogram_quantile",
    "metrics_for",
]

# Histogram bounds: FAST for short operations (a batch, a write: 10 us to 10 s),
# LATENCY for waits and delays (100 us to 5 min), SIZE for record counts.
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

_KINDS = {"counter": Counter, "gauge": Gauge, "histogram": Histogram}
_NAME = re.compile(r"flows_[a-z0-9_]+")
_LABEL = re.compile(r"[a-z][a-z0-9_]*")
_DEFAULT_BUCKETS = LATENCY_BUCKETS


def _labels(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _buckets(bounds: Iterable[float] | None) -> tuple[float, ...] | None:
    return None if bounds is None else tuple(bounds)


class CounterChild(Protocol):
    """A labelled counter: prometheus_client's ``Counter`` child or a ``FastCounter``."""

    def inc(self, amount: float = 1) -> None: ...


class GaugeChild(Protocol):
    """A labelled gauge (prometheus_client's ``Gauge`` child)."""

    def inc(self, amount: float = 1) -> None: ...
    def dec(self, amount: float = 1) -> None: ...
    def set(self, value: float) -> None: ...
    def set_function(self, f: Callable[[], float]) -> None: ...


class HistogramChild(Protocol):
    """A labelled histogram: prometheus_client's ``Histogram`` child or a ``FastHistogram``."""

    def observe(self, amount: float) -> None: ...


@attrs.frozen
class MetricFamily:
    """The declaration of one metric family: name, kind, help, extra labels.

    Every family also carries the labels ``flow`` and ``stage``; ``labels``
    lists the extra ones, each with values from a small fixed set (never a
    symbol). Names use the ``flows_`` prefix and base units; counters end in
    ``_total``. ``buckets`` are a histogram's upper bounds (default
    ``LATENCY_BUCKETS``):

    ```python
    REQUESTS = MetricFamily("flows_source_fix_requests_total", "counter",
                            "At a FIX source: requests sent, by type.", labels=("type",))
    ```

    A component lists the families it uses in a class attribute
    ``METRICS: tuple[MetricFamily, ...]`` (base classes' lists are inherited,
    see ``declared_metrics``) and reads its children with
    ``metrics.labeled(family, value)``: the family is registered on the
    registry on first use. Two declarations of one name must be equal.
    """

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = attrs.field(default=(), converter=_labels)
    buckets: tuple[float, ...] | None = attrs.field(default=None, converter=_buckets)

    def __attrs_post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"metric {self.name}: kind must be one of {sorted(_KINDS)}, "
                             f"not {self.kind!r}")
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"metric {self.name!r}: a name is flows_ then [a-z0-9_]")
        if self.name.endswith("_total") != (self.kind == "counter"):
            raise ValueError(f"metric {self.name}: counters, and only counters, end in _total")
        for label in self.labels:
            if not _LABEL.fullmatch(label) or label in ("flow", "stage", "le", "quantile"):
                raise ValueError(f"metric {self.name}: bad extra label {label!r}")
        if self.kind == "histogram":
            if self.buckets is None:
                object.__setattr__(self, "buckets", _DEFAULT_BUCKETS)
        elif self.buckets is not None:
            raise ValueError(f"metric {self.name}: only histograms have buckets")

    def create(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        """The prometheus_client family, registered on ``registry``."""
        kwargs = {"buckets": self.buckets} if self.kind == "histogram" else {}
        base = self.name.removesuffix("_total") if self.kind == "counter" else self.name
        return _KINDS[self.kind](base, self.help, FS + self.labels, registry=registry, **kwargs)


def declared_metrics(component: Any) -> tuple[MetricFamily, ...]:
    """The families a component (class or instance) declares in ``METRICS``,
    its base classes' included, without repeats."""
    cls = component if isinstance(component, type) else type(component)
    out: dict[str, MetricFamily] = {}
    for klass in reversed(cls.__mro__):
        for family in vars(klass).get("METRICS", ()):
            if not isinstance(family, MetricFamily):
                raise TypeError(f"{klass.__qualname__}.METRICS holds {family!r}, "
                                "not a MetricFamily")
            if out.setdefault(family.name, family) != family:
                raise ValueError(f"{cls.__qualname__} declares metric {family.name} twice, "
                                 f"differently: {out[family.name]!r} and {family!r}")
    return tuple(out.values())


_CORE = (
    MetricFamily("flows_records_received_total", "counter",
                 "Records a component took from its inbox (stages, sinks)."),
    MetricFamily("flows_records_sent_total", "counter",
                 "Records a component sent downstream (sources, stages)."),
    MetricFamily("flows_records_discarded_total", "counter",
                 "Records a component dropped, by reason (unchanged, invalid, evicted, error, ...).",
                 labels=("reason",)),
    MetricFamily("flows_errors_total", "counter",
                 "Errors a component met, by exception type: actor crashes and failed sink writes.",
                 labels=("error_type",)),
    MetricFamily("flows_actor_restarts_total", "counter",
                 "Times the supervisor restarted the actor."),
    MetricFamily("flows_actor_up", "gauge", "1 while the actor runs, 0 otherwise."),
    MetricFamily("flows_batch_processing_seconds", "histogram",
                 "Time a component spent on one batch (not counting waits on its inbox or outbox).",
                 buckets=FAST_BUCKETS),
    MetricFamily("flows_send_wait_seconds", "histogram",
                 "Time a send to the outbox blocked on a full channel (backpressure), per batch sent.",
                 buckets=FAST_BUCKETS),
    MetricFamily("flows_channel_buffer_batches", "gauge",
                 "Batches waiting in the component's inbox (stages, sinks)."),
    MetricFamily("flows_channel_capacity_batches", "gauge",
                 "Capacity of the component's inbox, in batches."),
    MetricFamily("flows_utilization_ratio", "gauge",
                 "Share of recent time the component was busy (0-1), computed at read time "
                 "over at least 1 s."),
    MetricFamily("flows_end_to_end_latency_seconds", "histogram",
                 "At a sink: time from the source making a batch to the sink having written it.",
                 buckets=LATENCY_BUCKETS),
    MetricFamily("flows_source_lag_seconds", "histogram",
                 "At a source: time from the exchange timestamp to the batch being sent.",
                 buckets=LATENCY_BUCKETS),
    MetricFamily("flows_gaps_total", "counter",
                 "At a source: gaps in its feed (a Gap record each), by reason: closed, error, "
                 "silent, timeout, server, server_shutdown, sequence, poll_failed, "
                 "rate_limited, stale, circuit_open, unknown_symbol.",
                 labels=("reason",)),
    MetricFamily("flows_source_last_record_age_seconds", "gauge",
                 "At a source: seconds since it last sent a valid record (since the start "
                 "when none yet)."),
    MetricFamily("flows_source_stale_after_seconds", "gauge",
                 "At a source: the age past which the source, or one of its symbols, is stale."),
    MetricFamily("flows_source_symbols", "gauge",
                 "At a source: symbols that have sent a valid record since the start."),
    MetricFamily("flows_source_stale_symbols", "gauge",
                 "At a source: symbols whose last valid record is older than stale_after."),
    MetricFamily("flows_source_poll_cycle_seconds", "histogram",
                 "At a source: time to refresh the whole symbol set once.",
                 buckets=LATENCY_BUCKETS),
    MetricFamily("flows_sink_write_seconds", "histogram",
                 "At a storing sink: time one successful write took.", buckets=FAST_BUCKETS),
    MetricFamily("flows_sink_batch_records", "histogram",
                 "At a storing sink: records per write.", buckets=SIZE_BUCKETS),
    MetricFamily("flows_sink_write_errors_total", "counter",
                 "At a storing sink: writes that failed."),
    MetricFamily("flows_sink_retries_total", "counter",
                 "At a storing sink: writes retried after a failure."),
    MetricFamily("flows_slow_batches_total", "counter",
                 "Batches whose processing crossed the slow threshold (warning, critical).",
                 labels=("severity",)),
    MetricFamily("flows_slow_poll_cycles_total", "counter",
                 "Source poll cycles that crossed the slow threshold (warning, critical).",
                 labels=("severity",)),
)

METRICS: dict[str, MetricFamily] = {family.name: family for family in _CORE}
"""The core families every component shares, by name. Families only some
components use are declared by them (``MetricFamily``, ``all_metrics``)."""

# Served by the live collector, computed at scrape time.
_LIVE = ("flows_channel_buffer_batches", "flows_channel_capacity_batches", "flows_utilization_ratio",
         "flows_source_last_record_age_seconds", "flows_source_stale_after_seconds",
         "flows_source_symbols", "flows_source_stale_symbols")

# Core families updated on every batch: counted into plain attributes
# (no lock; updated from the trio thread) and turned into samples at scrape
# time, with the same names, labels and samples prometheus_client gives.
_HOT = ("flows_records_received_total", "flows_records_sent_total",
        "flows_records_discarded_total", "flows_batch_processing_seconds",
        "flows_send_wait_seconds", "flows_end_to_end_latency_seconds",
        "flows_source_lag_seconds")


class FastCounter:
    """A counter child without a lock: ``inc`` adds to ``value`` (the hot
    path may add to ``value`` itself). For the trio thread: increments from
    several threads at once could be lost."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount

    def get(self) -> float:
        return self.value

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        out: list[tuple[str, dict[str, str], float]] = [("_total", {}, self.value)]
        if _pm._use_created:
            out.append(("_created", {}, self.created))
        return out


class FastHistogram:
    """A histogram child without a lock: ``observe`` adds to ``sum`` and to
    the count of the first bucket whose bound is >= the amount (``counts``
    per bucket, not cumulative). Same caveat as ``FastCounter``."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self.sum += amount
        i = bisect_left(self.bounds, amount)
        if amount <= self.bounds[i]:  # NaN lands in no bucket (as in prometheus_client)
            self.counts[i] += 1

    @contextmanager
    def time(self) -> Iterator[None]:
        """Observe the seconds the body takes."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.observe(max(time.perf_counter() - t0, 0.0))

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        out: list[tuple[str, dict[str, str], float]] = []
        acc = 0.0
        for bound, n in zip(self.bounds, list(self.counts)):
            acc += n
            out.append(("_bucket", {"le": floatToGoString(bound)}, acc))
        out.append(("_count", {}, acc))
        out.append(("_sum", {}, self.sum))
        if _pm._use_created:
            out.append(("_created", {}, self.created))
        return out


class FastFamily:
    """A registered family of ``FastCounter`` or ``FastHistogram`` children
    (``labels(flow, stage, *extra)``), collected like prometheus_client's."""

    def __init__(self, family: MetricFamily, registry: CollectorRegistry) -> None:
        self.family = family
        self.labelnames = FS + family.labels
        self.name = family.name.removesuffix("_total") if family.kind == "counter" else family.name
        if family.kind == "histogram":
            bounds = tuple(float(b) for b in family.buckets or ())
            if not bounds or bounds[-1] != math.inf:
                bounds += (math.inf,)
            self._new: Callable[[], Any] = lambda: FastHistogram(bounds)
        else:
            self._new = FastCounter
        self._children: dict[tuple[str, ...], Any] = {}
        registry.register(self)

    def labels(self, *values: Any) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.family.name}: expected labels {self.labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new()
        return child

    def describe(self) -> list[Metric]:
        return [Metric(self.name, self.family.help, self.family.kind)]

    def collect(self) -> list[Metric]:
        metric = Metric(self.name, self.family.help, self.family.kind)
        for values, child in list(self._children.items()):
            series = dict(zip(self.labelnames, values))
            for suffix, labels, value in child.samples():
                metric.add_sample(self.name + suffix, {**series, **labels}, value)
        return [metric]


class FlowMetrics:
    """All flows_ metric families registered on one registry: the core ones
    from the start, a component's own ones on first use."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.families: dict[str, Counter | Gauge | Histogram | FastFamily] = {}
        self.declared: dict[str, MetricFamily] = {}
        for family in METRICS.values():
            if family.name in _LIVE:
                self.declared[family.name] = family  # served by the live collector below
            elif family.name in _HOT:
                self.families[family.name] = FastFamily(family, registry)
                self.declared[family.name] = family
            else:
                self.declare(family)
        self.components: list[ComponentMetrics] = []
        registry.register(_LiveCollector(self))

    def declare(self, family: MetricFamily) -> Counter | Gauge | Histogram | FastFamily:
        """The registered family ``family`` declares: registered now on first
        use; a different declaration of the same name is a ValueError."""
        known = self.declared.get(family.name)
        if known is None:
            self.families[family.name] = family.create(self.registry)
            self.declared[family.name] = family
        elif known != family:
            raise ValueError(f"metric {family.name} is declared twice, differently: "
                             f"{known!r} and {family!r}")
        return self.families[family.name]

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
        self._labeled: dict[tuple[str, ...], Any] = {}
        self.received = self.counter("flows_records_received_total")
        self.sent = self.counter("flows_records_sent_total")
        self.restarts = self.counter("flows_actor_restarts_total")
        self.up = self.gauge("flows_actor_up")
        self.processing = self.histogram("flows_batch_processing_seconds")
        self.send_wait = self.histogram("flows_send_wait_seconds")
        self.end_to_end = self.histogram("flows_end_to_end_latency_seconds")
        self.lag = self.histogram("flows_source_lag_seconds")
        self.poll_cycle = self.histogram("flows_source_poll_cycle_seconds")
        self.write_seconds = self.histogram("flows_sink_write_seconds")
        self.write_records = self.histogram("flows_sink_batch_records")
        self.write_errors = self.counter("flows_sink_write_errors_total")
        self.write_retries = self.counter("flows_sink_retries_total")
        self._discards: dict[str, CounterChild] = {}
        self._slow_batch = math.inf
        self.slow = SlowThresholds()
        self._slow_log_after: dict[str, float] = {}
        # Live figures read by the collector at scrape time.
        self.buffer: Callable[[], tuple[int, float]] | None = None
        self.pending: Callable[[], int] | None = None  # conflation buffer
        self.freshness: Any = None  # a source's Freshness, set by the runtime
        self.busy_seconds = 0.0
        self.wait_seconds = 0.0  # spent in sends, blocked or in an inlined stage: not processing
        self._util_ref = (time.monotonic(), 0.0)
        self._util_value = 0.0

    def labeled(self, family: MetricFamily | str, *values: str) -> Any:
        """This component's child of ``family`` (with ``values`` for the
        family's extra labels), created on first use and cached.

        ``family`` is a ``MetricFamily`` (registered on the registry on first
        use) or the name of one already registered (the core families).
        """
        name = family if isinstance(family, str) else family.name
        key = (name, *values)
        child = self._labeled.get(key)
        if child is None:
            fm = self.flow_metrics
            if isinstance(family, MetricFamily):
                parent = fm.declare(family)
            elif name in fm.families:
                parent = fm.families[name]
            else:
                raise KeyError(f"metric {name} is not registered: pass its MetricFamily")
            child = self._labeled[key] = parent.labels(self.flow, self.stage, *values)
        return child

    def counter(self, family: MetricFamily | str, *values: str) -> CounterChild:
        """``labeled`` for a counter family, typed (a TypeError for another kind)."""
        return cast(CounterChild, self._typed(family, "counter", values))

    def gauge(self, family: MetricFamily | str, *values: str) -> GaugeChild:
        """``labeled`` for a gauge family, typed (a TypeError for another kind)."""
        return cast(GaugeChild, self._typed(family, "gauge", values))

    def histogram(self, family: MetricFamily | str, *values: str) -> HistogramChild:
        """``labeled`` for a histogram family, typed (a TypeError for another kind)."""
        return cast(HistogramChild, self._typed(family, "histogram", values))

    def _typed(self, family: MetricFamily | str, kind: str, values: tuple[str, ...]) -> Any:
        declared = family if isinstance(family, MetricFamily) else (
            self.flow_metrics.declared.get(family))
        if declared is not None and declared.kind != kind:
            raise TypeError(f"metric {declared.name} is a {declared.kind}, not a {kind}")
        return self.labeled(family, *values)

    def register(self, *families: MetricFamily) -> None:
        """Register ``families`` now, so /metrics lists them before first use."""
        for family in families:
            self.flow_metrics.declare(family)

    def discarded(self, reason: str, n: int = 1) -> None:
        """Count ``n`` records dropped for ``reason`` (a small fixed word)."""
        child = self._discards.get(reason)
        if child is None:
            child = self._discards[reason] = self.counter("flows_records_discarded_total", reason)
        child.inc(n)

    def error(self, error_type: str) -> None:
        """Count one error of ``error_type`` (a small fixed word or class name)."""
        self.counter("flows_errors_total", error_type).inc()

    def observe_processing(self, seconds: float) -> None:
        self.busy_seconds += seconds
        self.processing.observe(seconds)
        if seconds >= self._slow_batch:
            self._slow("flows_slow_batches_total", "batch", seconds, self.slow.batch)

    def observe_poll_cycle(self, seconds: float) -> None:
        """A source refreshed its whole symbol set in ``seconds``."""
        self.poll_cycle.observe(seconds)
        if seconds >= self.slow.cycle[0]:
            self._slow("flows_slow_poll_cycles_total", "poll cycle", seconds, self.slow.cycle)

    def _slow(self, metric: str, what: str, seconds: float, limits: tuple[float, float]) -> None:
        severity = "critical" if seconds >= limits[1] else "warning"
        self.counter(metric, severity).inc()
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

    @property
    def slow(self) -> SlowThresholds:
        """When a batch or a poll cycle counts as slow."""
        return self._thresholds

    @slow.setter
    def slow(self, value: SlowThresholds) -> None:
        self._thresholds = value
        self._slow_batch = value.batch[0]  # read on every batch

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
        doc = {n: METRICS[n].help for n in _LIVE}
        used = GaugeMetricFamily(
            "flows_channel_buffer_batches", doc["flows_channel_buffer_batches"], labels=FS
        )
        cap = GaugeMetricFamily(
            "flows_channel_capacity_batches", doc["flows_channel_capacity_batches"], labels=FS
        )
        util = GaugeMetricFamily(
            "flows_utilization_ratio", doc["flows_utilization_ratio"], labels=FS
        )
        fresh = {n: GaugeMetricFamily(n, doc[n], labels=FS) for n in _LIVE[3:]}
        for c in list(self._fm.components):
            labels = [c.flow, c.stage]
            if c.buffer is not None:
                n, capacity = c.buffer()
                used.add_metric(labels, n)
                cap.add_metric(labels, capacity)
            util.add_metric(labels, c.utilization())
            f = c.freshness
            if f is not None:
                now = f.now()
                fresh["flows_source_last_record_age_seconds"].add_metric(labels, f.age(now))
                fresh["flows_source_stale_after_seconds"].add_metric(labels, f.stale_after)
                fresh["flows_source_symbols"].add_metric(labels, len(f.symbols))
                fresh["flows_source_stale_symbols"].add_metric(labels, f.stale_symbols(now))
        yield from (used, cap, util, *fresh.values())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
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


quantile = histogram_quantile  # the engine's older name
