"""Typed metric handles: ComponentMetrics.counter/gauge/histogram return a
child of the right kind (the core families are typed attributes), and a
family asked for as another kind is a TypeError, not a wrong series."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from flows import MetricFamily
from flows._metrics import metrics_for

QUEUE = MetricFamily("flows_test_queue_depth", "gauge", "Test: items queued.")
SENT = MetricFamily("flows_test_sent_total", "counter", "Test: items sent.", labels=("reason",))


def component():
    registry = CollectorRegistry()
    return metrics_for(registry).component("f", "s", "source"), registry


def test_handles_count_into_their_series():
    m, registry = component()
    m.counter(SENT, "ok").inc(3)
    m.gauge(QUEUE).set(7)
    m.histogram("flows_batch_processing_seconds").observe(0.5)
    m.counter("flows_errors_total", "Boom").inc()
    value = registry.get_sample_value
    assert value("flows_test_sent_total", {"flow": "f", "stage": "s", "reason": "ok"}) == 3
    assert value("flows_test_queue_depth", {"flow": "f", "stage": "s"}) == 7
    assert m.counter(SENT, "ok") is m.labeled(SENT, "ok")  # one cached child


@pytest.mark.parametrize(("ask", "family"), [
    ("gauge", SENT), ("histogram", QUEUE), ("counter", "flows_batch_processing_seconds"),
    ("gauge", "flows_records_sent_total"),
])
def test_a_family_asked_for_as_another_kind_is_a_type_error(ask, family):
    m, _ = component()
    args = ("x",) if family is SENT else ()
    with pytest.raises(TypeError, match=r"is a .*, not a"):
        getattr(m, ask)(family, *args)


def test_core_children_are_the_cached_typed_ones():
    m, _ = component()
    assert m.received is m.counter("flows_records_received_total")
    assert m.lag is m.histogram("flows_source_lag_seconds")
    assert m.up is m.gauge("flows_actor_up")
