"""The public surface: what `flows` re-exports, and that it is all documented."""

from __future__ import annotations

import re
from pathlib import Path

import flows
from flows import METRICS

README = Path(__file__).resolve().parent.parent / "README.md"

PUBLIC = {
    "Batch", "BatchingSink", "ChangeDetector", "CircuitBreaker", "Edge", "Flow", "FlowError", "FlowFailed",
    "FunctionStage", "Inbox", "METRICS", "Outbox", "RateLimit", "Retry", "RunContext", "RunResult", "Runtime", "Sink",
    "Shard", "SlowThresholds", "Source", "Stage", "Supervision", "Tick", "run_flow", "shard_of", "stage",
}


def test_public_names_are_reexported_from_private_modules():
    exported = {name for name in vars(flows) if not name.startswith("_")}
    exported -= {"testing", "run", "top"}  # subpackage and CLI modules, once imported
    assert exported == PUBLIC
    for name in PUBLIC - {"METRICS"}:
        module = getattr(flows, name).__module__
        assert module.startswith("flows._"), (name, module)


def test_readme_documents_every_metric():
    text = README.read_text()
    missing = [name for name in METRICS if f"`{name}`" not in text]
    assert not missing, f"README.md's metrics reference lacks {missing}"


def test_metric_names_follow_the_conventions():
    for name, (kind, labels, _) in METRICS.items():
        assert name.startswith("flows_")
        assert name.endswith("_total") == (kind == "counter"), name
        if kind == "histogram":
            assert re.search(r"_(seconds|records)$", name), name
        assert set(labels) <= {"reason", "error_type", "endpoint", "status_class", "severity"}, name
