"""Per-actor figures read back from the metrics: /status and the console summary."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ._metrics import FlowMetrics, quantile

if TYPE_CHECKING:
    from ._runtime import Runtime

__all__ = ["figures", "flow_status"]

_COUNTERS = {
    "flows_records_received_total": "received",
    "flows_records_sent_total": "sent",
    "flows_actor_restarts_total": "restarts",
    "flows_sink_write_errors_total": "write_errors",
    "flows_sink_retries_total": "write_retries",
}
_HISTOGRAMS = {
    "flows_batch_processing_seconds": "processing",
    "flows_send_wait_seconds": "send_wait",
    "flows_end_to_end_latency_seconds": "end_to_end",
    "flows_source_lag_seconds": "lag",
    "flows_sink_write_seconds": "write",
    "flows_sink_batch_records": "write_records",
}


PARKED_SHOWN = 10  # parked symbols named in /status


def figures(fm: FlowMetrics, flow: str) -> dict[str, dict[str, Any]]:
    """{stage: figures} for one flow: counters, discards by reason, histograms.

    A histogram figure is ``{"count", "sum", "buckets": [(le, cumulative)]}``.
    """
    out: dict[str, dict[str, Any]] = defaultdict(
        lambda: {"discarded": {}, "errors": {}, "histograms": {}}
    )
    for name, family in fm.families.items():
        for metric in family.collect():
            for s in metric.samples:
                if s.labels.get("flow") != flow:
                    continue
                fig = out[s.labels["stage"]]
                if s.name in _COUNTERS:
                    fig[_COUNTERS[s.name]] = s.value
                elif s.name == "flows_records_discarded_total":
                    fig["discarded"][s.labels["reason"]] = s.value
                elif s.name == "flows_errors_total":
                    fig["errors"][s.labels["error_type"]] = s.value
                elif name in _HISTOGRAMS:
                    h = fig["histograms"].setdefault(
                        _HISTOGRAMS[name], {"count": 0.0, "sum": 0.0, "buckets": []}
                    )
                    if s.name.endswith("_bucket"):
                        h["buckets"].append((float(s.labels["le"]), s.value))
                    elif s.name.endswith("_count"):
                        h["count"] = s.value
                    elif s.name.endswith("_sum"):
                        h["sum"] = s.value
    return dict(out)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 6)


def _summarize(h: dict[str, Any] | None) -> dict[str, Any]:
    if not h or not h["count"]:
        return {"count": 0, "p50": None, "p99": None, "mean": None}
    return {
        "count": int(h["count"]),
        "p50": _finite(quantile(0.5, h["buckets"])),
        "p99": _finite(quantile(0.99, h["buckets"])),
        "mean": round(h["sum"] / h["count"], 6),
    }


def flow_status(rt: Runtime) -> dict[str, Any]:
    """The JSON served on /status."""
    figs = figures(rt.metrics, rt.flow.name)
    actors = []
    for slot in rt.slots:
        f = figs.get(slot.actor.name, {"discarded": {}, "errors": {}, "histograms": {}})
        m = slot.metrics
        entry: dict[str, Any] = {
            "name": slot.actor.name,
            "kind": slot.kind,
            "state": slot.state,
            "restarts": slot.restarts,
            "last_error": slot.last_error,
            "received": int(f.get("received", 0)),
            "sent": int(f.get("sent", 0)),
            "discarded": {k: int(v) for k, v in f["discarded"].items()},
            "errors": {k: int(v) for k, v in f["errors"].items()},
            "utilization": round(m.utilization(), 4),
        }
        if slot.freshness is not None:
            entry["freshness"] = slot.freshness.figures()
        parked = getattr(slot.actor, "parked", None)
        if parked:  # symbols unknown to the API: never stale, as they never answered
            names = sorted(parked)
            entry["parked"] = {"count": len(names), "symbols": names[:PARKED_SHOWN]}
        schedule_figures = getattr(getattr(slot.actor, "schedule", None), "figures", None)
        if schedule_figures is not None:
            entry["schedule"] = schedule_figures()
        if m.buffer is not None:
            used, cap = m.buffer()
            entry["buffer"] = {"used": used, "capacity": cap}
            if m.pending is not None:
                entry["buffer"]["pending_records"] = m.pending()
        for key, h in f["histograms"].items():
            if key == "write_records":
                if h["count"]:
                    entry["written"] = int(h["sum"])
            elif h["count"]:
                entry[f"{key}_seconds"] = _summarize(h)
        actors.append(entry)
    flow = rt.flow
    return {
        "flow": flow.name,
        "state": rt.state,
        "stop_reason": rt.stop_reason,
        "uptime_seconds": round(time.monotonic() - rt.started_at, 3),
        "ready": rt.ready()[0],
        "actors": actors,
        "edges": edges(rt),
        "gaps": rt.gaps.figures(),
    }


def edges(rt: Runtime) -> list[dict[str, Any]]:
    """The flow's edges: producer, consumer, branch (of a split or route),
    the consumer's channel settings and, once running, buffer and send-wait."""
    live = {(link.producer, link.consumer, link.branch or None): link for link in rt.links}
    out = rt.flow.describe()["edges"]
    for entry in out:
        link = live.get((entry["from"], entry["to"], entry["branch"]))
        if link is not None:
            entry.update(link.figures())
    return out
