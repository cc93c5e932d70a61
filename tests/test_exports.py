"""The public surface: what `flows` re-exports, that it is all documented, and
that components, examples and the docs use nothing else."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

import flows
from flows import METRICS, all_metrics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
METRICS_PAGE = DOCS / "operations" / "metrics.md"


def docs_text() -> str:
    """Every page of the documentation site."""
    return "\n".join(p.read_text() for p in sorted(DOCS.rglob("*.md")))

PUBLIC = {
    # the engine
    "Batch", "ChangeDetector", "Edge", "Flow", "FlowError", "FlowFailed", "FunctionStage", "Inbox",
    "Outbox", "RunContext", "RunResult", "Runtime", "Shard", "SlowThresholds", "Sink", "Source",
    "Stage", "Supervision", "Tick", "run_flow", "shard_of", "stage", "Stream", "Routes", "Gap", "Trade", "Candle",
    "Window", "Candles",
    # writing components: bases, their request/parse types, resilience
    "BatchingSink", "CircuitBreaker", "HttpError", "HttpSource", "Parsed", "RECONNECT_REASONS",
    "RateLimit", "RateBudget", "Request", "Retry", "StreamParsed", "WebSocketSource",
    "parse_optional_float",
    "parse_price", "DropLog", "write_atomic", "check_tick", "check_symbols", "Progress",
    # adaptive polling: per-symbol schedules, market hours
    "AdaptiveSchedule", "Calendar",
    # secrets: masking them wherever a URL, DSN or error is shown
    "redact", "add_secret",
    # metrics: the core table, declarations, reading them back
    "METRICS", "MetricFamily", "ComponentMetrics", "all_metrics", "declared_metrics",
    "FAST_BUCKETS", "LATENCY_BUCKETS", "SIZE_BUCKETS", "histogram_quantile", "flow_figures",
    # storing sinks: a record type as a table
    "RecordSchema", "record_schema",
    # the component registry (entry points)
    "Component", "ComponentError", "components", "load_component",
}  # fmt: skip
CONSTANTS = {"METRICS", "RECONNECT_REASONS", "FAST_BUCKETS", "LATENCY_BUCKETS", "SIZE_BUCKETS"}

# Where component code lives: none of it may import a private flows module.
COMPONENT_DIRS = ("sources", "sinks", "examples")


def test_public_names_are_reexported_from_private_modules():
    exported = {name for name in vars(flows) if not name.startswith("_")}
    exported -= {"testing", "run", "top"}  # subpackage and CLI modules, once imported
    assert exported == PUBLIC
    for name in PUBLIC - CONSTANTS:
        module = getattr(flows, name).__module__
        assert module.startswith("flows._"), (name, module)


def test_docs_document_every_public_name():
    text = docs_text()
    missing = sorted(name for name in PUBLIC if f"`{name}`" not in text and f"`{name}(" not in text)
    assert not missing, f"the docs (docs/*.md) do not mention {missing}"
    api = (DOCS / "api.md").read_text()
    unrendered = sorted(name for name in PUBLIC if f"::: flows.{name}\n" not in api)
    assert not unrendered, f"docs/api.md does not render {unrendered}"


def private_imports(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every import of a private flows module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] == "flows":
                if any(p.startswith("_") for p in parts[1:]):
                    found.append((node.lineno, f"from {node.module} import ..."))
                elif len(parts) == 1:
                    found += [(node.lineno, f"from flows import {a.name}")
                              for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "flows" and any(p.startswith("_") for p in parts[1:]):
                    found.append((node.lineno, f"import {alias.name}"))
    return found


def test_components_and_examples_import_only_public_names():
    files = sorted(p for d in COMPONENT_DIRS for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 15
    bad = [f"{path.relative_to(ROOT)}:{line}: {what}"
           for path in files for line, what in private_imports(path)]
    assert not bad, "private flows names imported (use `from flows import ...`):\n" + "\n".join(bad)


def test_the_import_check_catches_each_form(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import flows._http\n"
        "from flows._limits import RateLimit\n"
        "from flows import _records\n"
        "def f():\n"
        "    from flows._stream import WebSocketSource\n"
        "from flows import Flow, HttpSource\n"
        "from flows.testing import ListSink\n"
    )
    assert [line for line, _ in private_imports(bad)] == [1, 2, 3, 5]


# -- metrics: the core table plus what components declare -------------------------------


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_metrics_are_the_core_table_plus_component_declarations():
    every = all_metrics()
    assert set(METRICS) < set(every)
    for name, family in METRICS.items():
        assert every[name] is family
    http = {f.name for f in flows.declared_metrics(flows.HttpSource)}
    ws = {f.name for f in flows.declared_metrics(flows.WebSocketSource)}
    assert http == {
        "flows_source_request_seconds", "flows_source_responses_total", "flows_source_retries_total",
        "flows_source_rate_limit_wait_seconds", "flows_source_circuit_state",
        "flows_source_budget_wait_seconds", "flows_source_budget_fallback",
        "flows_source_budget_pauses_total",
        # adaptive polling (flows/_schedule.py)
        "flows_source_requests_saved_total", "flows_source_poll_interval_seconds",
        "flows_source_detection_delay_seconds",
    }
    assert ws == {
        "flows_source_messages_total", "flows_source_reconnects_total",
        "flows_source_connection_uptime_seconds", "flows_source_gaps_total",
    }
    assert not (http | ws) & set(METRICS), "component families stay out of the engine's table"
    from sources.fmp import FMPDividends
    from sources.livecoinwatch import LiveCoinWatchPrices

    own = {f.name for cls in (LiveCoinWatchPrices, FMPDividends)
           for f in flows.declared_metrics(cls)} - http  # credits, skipped symbols
    assert own == {"flows_source_credits_remaining", "flows_source_credits_spent_total",
                   "flows_source_skipped_total"}
    assert set(every) == set(METRICS) | http | ws | own  # what the shipped components declare


def test_docs_metrics_reference_is_generated_from_the_declarations():
    reference = load_script(ROOT / "docs" / "metrics_reference.py")
    text = METRICS_PAGE.read_text()
    assert reference.current(text) == reference.render(), (
        "docs/operations/metrics.md's table differs from the declarations: "
        "run python docs/metrics_reference.py"
    )
    missing = [name for name in all_metrics() if f"`{name}`" not in text]
    assert not missing, f"the metrics reference lacks {missing}"


def test_metric_names_follow_the_conventions():
    for name, family in all_metrics().items():
        assert name == family.name and name.startswith("flows_")
        assert name.endswith("_total") == (family.kind == "counter"), name
        if family.kind == "histogram":
            assert re.search(r"_(seconds|records)$", name), name
            assert family.buckets and list(family.buckets) == sorted(family.buckets), name
        assert set(family.labels) <= {"reason", "error_type", "endpoint", "status_class", "severity"}, name


@pytest.mark.parametrize("bad, message", [
    ({"name": "flows_x_total", "kind": "summary", "help": "h"}, "kind"),
    ({"name": "x_total", "kind": "counter", "help": "h"}, "flows_"),
    ({"name": "flows_x", "kind": "counter", "help": "h"}, "_total"),
    ({"name": "flows_x_total", "kind": "gauge", "help": "h"}, "_total"),
    ({"name": "flows_x_total", "kind": "counter", "help": "h", "labels": ("stage",)}, "label"),
    ({"name": "flows_x_total", "kind": "counter", "help": "h", "labels": ("Bad-Label",)}, "label"),
    ({"name": "flows_x", "kind": "gauge", "help": "h", "buckets": (1.0,)}, "buckets"),
])
def test_a_bad_declaration_fails_when_made(bad, message):
    with pytest.raises(ValueError, match=message):
        flows.MetricFamily(**bad)


def test_a_histogram_without_buckets_gets_the_latency_ones():
    family = flows.MetricFamily("flows_x_seconds", "histogram", "h")
    assert family.buckets == flows.LATENCY_BUCKETS
    assert family == flows.MetricFamily("flows_x_seconds", "histogram", "h", buckets=flows.LATENCY_BUCKETS)
