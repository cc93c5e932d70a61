"""Metric families a component declares: registered on first use, once per
registry, checked for agreement; inherited from base classes."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from flows import (
    Batch,
    Component,
    Flow,
    FlowFailed,
    HttpSource,
    MetricFamily,
    Outbox,
    Supervision,
    Tick,
    WebSocketSource,
    all_metrics,
    declared_metrics,
)
from flows._metrics import metrics_for
from flows.testing import ListSink, assert_component_metrics, run_briefly, sample

FILLS = MetricFamily("flows_source_fills_total", "counter", "Fills seen, by side.", labels=("side",))
BOOK_DEPTH = MetricFamily("flows_source_book_depth_records", "histogram", "Book levels per update.",
                          buckets=(1, 10, 100))
OTHER_FILLS = MetricFamily("flows_source_fills_total", "counter", "Fills, by venue.", labels=("venue",))


class FillSource:
    """Source: one batch, counting its fills in a family of its own."""

    METRICS = (FILLS, BOOK_DEPTH)

    def __init__(self, name: str = "fills", family: MetricFamily = FILLS) -> None:
        self.name, self.family = name, family

    async def run(self, outbox: Outbox) -> None:
        m = outbox.metrics
        with m.timed_batch():
            m.labeled(self.family, "buy").inc(2)
            m.labeled(BOOK_DEPTH).observe(12)
            batch = Batch([Tick(self.name, "BTC", 1.0, 1.0)])
        await outbox.send(batch)


async def test_a_declared_family_is_registered_on_first_use():
    registry = CollectorRegistry()
    assert "flows_source_fills_total" not in metrics_for(registry).families
    flow = Flow("own", sources=[FillSource(), FillSource("fills2")], sinks=[ListSink()])
    _, registry = await run_briefly(flow)
    assert sample(registry, "flows_source_fills_total", "own", "fills", side="buy") == 2
    assert sample(registry, "flows_source_fills_total", "own", "fills2", side="buy") == 2
    assert sample(registry, "flows_source_book_depth_records_bucket", "own", "fills", le="100.0") == 1
    assert_component_metrics(registry, "own", "fills", "source")
    # one family on the registry, whichever component came first
    fm = metrics_for(registry)
    assert fm.declared["flows_source_fills_total"] is FILLS


def test_children_are_cached_and_the_same_declaration_may_come_twice():
    fm = metrics_for(CollectorRegistry())
    a, b = fm.component("f", "a", "source"), fm.component("f", "b", "source")
    child = a.labeled(FILLS, "buy")
    assert a.labeled(FILLS, "buy") is child
    assert a.labeled("flows_source_fills_total", "buy") is child  # by name, once registered
    equal = MetricFamily("flows_source_fills_total", "counter", "Fills seen, by side.", labels=("side",))
    b.labeled(equal, "sell").inc()
    assert fm.families["flows_source_fills_total"] is fm.declare(FILLS)


def test_two_different_declarations_of_one_name_are_an_error():
    fm = metrics_for(CollectorRegistry())
    fm.component("f", "a", "source").labeled(FILLS, "buy")
    with pytest.raises(ValueError, match="flows_source_fills_total is declared twice, differently"):
        fm.component("f", "b", "source").labeled(OTHER_FILLS, "x")
    with pytest.raises(ValueError, match="declared twice"):  # nor may a core name be redeclared
        fm.declare(MetricFamily("flows_records_sent_total", "counter", "Something else."))


def test_an_undeclared_name_says_what_to_do():
    m = metrics_for(CollectorRegistry()).component("f", "a", "source")
    with pytest.raises(KeyError, match="pass its MetricFamily"):
        m.labeled("flows_source_nothing_total")


async def test_a_conflict_at_run_time_stops_the_flow_naming_the_metric(autojump_clock):
    flow = Flow("clash", sources=[FillSource(), FillSource("other", OTHER_FILLS)], sinks=[ListSink()],
                supervision=Supervision(max_restarts=0))
    with pytest.raises(FlowFailed, match="flows_source_fills_total"):
        await run_briefly(flow)


def test_declarations_are_inherited_along_the_class_hierarchy():
    class Base:
        METRICS = (FILLS,)

    class Child(Base):
        METRICS = (BOOK_DEPTH,)  # adds to the base's, need not repeat them

    class Grandchild(Child):
        pass

    assert declared_metrics(Grandchild) == (FILLS, BOOK_DEPTH)
    assert declared_metrics(Grandchild()) == (FILLS, BOOK_DEPTH)
    assert declared_metrics(object) == ()
    assert len(declared_metrics(HttpSource)) == 12 and len(declared_metrics(WebSocketSource)) == 4

    class Wrong:
        METRICS = ("flows_x_total",)

    with pytest.raises(TypeError, match="not a MetricFamily"):
        declared_metrics(Wrong)

    class Confused(Base):
        METRICS = (OTHER_FILLS,)

    with pytest.raises(ValueError, match="Confused declares metric flows_source_fills_total twice"):
        declared_metrics(Confused)


class ClashingSource:
    """Source: declares a family another component declares differently."""

    METRICS = (OTHER_FILLS,)
    name = "clash"

    async def run(self, outbox: Outbox) -> None:
        pass


def test_all_metrics_refuses_two_components_that_disagree(monkeypatch):
    import flows._registry as registry

    fake = [Component("source", "fills", f"{__name__}:FillSource", "a"),
            Component("source", "clash", f"{__name__}:ClashingSource", "b")]
    monkeypatch.setattr(registry, "components", lambda kind=None: fake)
    with pytest.raises(ValueError, match=f"flows_source_fills_total is declared differently by "
                                         f"{__name__}:FillSource and {__name__}:ClashingSource"):
        all_metrics()
    monkeypatch.setattr(registry, "components", lambda kind=None: fake[:1])
    assert {"flows_source_fills_total", "flows_source_book_depth_records"} <= set(all_metrics())


def test_labeled_costs_one_dict_lookup_once_cached():
    """The hot path: a cached child is found without touching the registry."""
    fm = metrics_for(CollectorRegistry())
    m = fm.component("f", "a", "source")
    m.labeled(FILLS, "buy")
    fm.declare = None  # would fail if called again
    for _ in range(3):
        m.labeled(FILLS, "buy").inc()
