"""Write ``dashboards/flows.json``, the Grafana dashboard of flows' metrics.

The dashboard is generated rather than edited by hand so that its ~35
panels stay uniform (one datasource variable, one ``flow`` variable, the
same legend and unit conventions). After changing this file run::

    python dashboards/generate.py

The metric families come from their declarations: ``flows.all_metrics()``,
the engine's core table plus what every registered component (entry points
``flows.sources``, ``flows.sinks``) declares. Writing fails when a panel
queries a family nobody declares, and a declared family that no panel below
shows gets a generic panel in an "Other components" row, so a new
component's metrics reach the dashboard without editing this file.

``tests/test_observability.py`` checks that ``flows.json`` is what this
script writes, that every metric it queries is declared and on a running
flow's ``/metrics``, and that every query runs on a real Prometheus.

Grafana 9 or newer: Dashboards -> Import -> upload ``flows.json``, pick
your Prometheus data source. Panels use the ``datasource`` variable, so
the data source can also be switched from the dashboard's header.

The metrics carry no ``kind`` label, so three hidden variables sort the
actors of the chosen flow by kind, from the shape of their series:

- ``source``: actors without an inbox (no ``flows_channel_capacity_batches``);
- ``sink``: actors that measured end-to-end latency (only sinks do);
- ``stage``: the other actors with an inbox. A sink that has not received
  a batch yet is listed here until it does.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
OUT = HERE / "flows.json"
sys.path.insert(0, str(HERE.parent))  # the checkout's flows, whatever is installed

import flows

DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"


def sel(kind: str | None = None, extra: str = "") -> str:
    """A label selector for the chosen flow (and actor kind)."""
    parts = ['flow=~"$flow"']
    if kind is not None:
        parts.append(f'stage=~"${kind}"')
    if extra:
        parts.append(extra)
    return "{" + ", ".join(parts) + "}"


def rate(metric: str, kind: str | None, by: str = "stage", extra: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{sel(kind, extra)}[{RATE}]))"


def quantile(q: float, metric: str, kind: str | None, by: str = "stage") -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) "
        f"(rate({metric}_bucket{sel(kind)}[{RATE}])))"
    )


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True, "refId": ref}


def p50_p99(metric: str, kind: str | None, by: str = "stage") -> list[tuple[str, str]]:
    label = " ".join("{{" + b + "}}" for b in by.split(", "))
    return [
        (quantile(0.5, metric, kind, by), f"{label} p50"),
        (quantile(0.99, metric, kind, by), f"{label} p99"),
    ]


class Layout:
    """Places panels three to a line under full-width rows."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append({
            "collapsed": False,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
            "id": self._id(),
            "panels": [],
            "title": title,
            "type": "row",
        })
        self.y += 1

    def panel(
        self,
        title: str,
        description: str,
        targets: list[tuple[str, str]],
        *,
        unit: str,
        kind: str = "timeseries",
        mappings: list[dict[str, Any]] | None = None,
        thresholds: list[dict[str, Any]] | None = None,
        stack: bool = False,
    ) -> None:
        defaults: dict[str, Any] = {"unit": unit}
        if kind == "timeseries":
            defaults["custom"] = {
                "drawStyle": "line",
                "fillOpacity": 10 if stack else 0,
                "lineWidth": 1,
                "showPoints": "never",
                "spanNulls": False,
                "stacking": {"group": "A", "mode": "normal" if stack else "none"},
            }
            defaults["min"] = 0
            options: dict[str, Any] = {
                "legend": {"calcs": ["mean", "max", "lastNotNull"], "displayMode": "table",
                           "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:  # state-timeline
            defaults["custom"] = {"fillOpacity": 70, "lineWidth": 0}
            defaults["color"] = {"mode": "thresholds"}
            options = {
                "alignValue": "center",
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "mergeValues": True,
                "rowHeight": 0.9,
                "showValue": "auto",
                "tooltip": {"mode": "single", "sort": "none"},
            }
        if mappings:
            defaults["mappings"] = mappings
        if thresholds:
            defaults["thresholds"] = {"mode": "absolute", "steps": thresholds}
        self.panels.append({
            "datasource": DS,
            "description": description,
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "gridPos": {"h": 8, "w": 8, "x": self.x, "y": self.y},
            "id": self._id(),
            "options": options,
            "targets": [
                target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
            ],
            "title": title,
            "type": kind,
        })
        self.x += 8
        if self.x == 24:
            self.x = 0
            self.y += 8


def _value_map(values: dict[int, tuple[str, str]]) -> list[dict[str, Any]]:
    return [{
        "type": "value",
        "options": {
            str(v): {"color": color, "index": i, "text": text}
            for i, (v, (text, color)) in enumerate(values.items())
        },
    }]


def _core_panels(lay: Layout, kind: str, noun: str) -> None:
    """Panels every actor kind has."""
    lay.panel(
        f"{noun}: batch processing p50 / p99",
        "Time spent on one batch, not counting waits on the inbox or outbox "
        "(flows_batch_processing_seconds).",
        p50_p99("flows_batch_processing_seconds", kind),
        unit="s",
    )
    if kind != "sink":
        lay.panel(
            f"{noun}: send-wait (backpressure)",
            "Seconds per second a send to the outbox blocked on a full channel: 1.0 means "
            "the actor spent all its time waiting on downstream (flows_send_wait_seconds).",
            [(rate("flows_send_wait_seconds_sum", kind), "{{stage}}")],
            unit="percentunit",
        )
    if kind != "source":
        lay.panel(
            f"{noun}: inbox buffer use",
            "Batches waiting in the actor's inbox over its capacity "
            "(flows_channel_buffer_batches / flows_channel_capacity_batches). "
            "Near 100% the actor is the bottleneck.",
            [(
                (f"sum by (stage) (flows_channel_buffer_batches{sel(kind)}) / "
                 f"sum by (stage) (flows_channel_capacity_batches{sel(kind)})"),
                "{{stage}}",
            )],
            unit="percentunit",
        )
    lay.panel(
        f"{noun}: utilization",
        "Share of recent time the actor was busy (flows_utilization_ratio).",
        [(f"max by (stage) (flows_utilization_ratio{sel(kind)})", "{{stage}}")],
        unit="percentunit",
    )
    lay.panel(
        f"{noun}: drops by reason",
        "Records dropped per second, by reason (flows_records_discarded_total).",
        [(rate("flows_records_discarded_total", kind, "stage, reason"), "{{stage}} {{reason}}")],
        unit="suffix:rec/s",
        stack=True,
    )


def metric_names(text: str, known: dict[str, Any]) -> set[str]:
    """The flows_ families named in PromQL text (``_bucket`` etc. of a known
    histogram count as the histogram)."""
    names = set()
    for name in re.findall(r"\bflows_[a-z0-9_]+", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in known:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def _queried(lay: Layout, known: dict[str, Any]) -> set[str]:
    exprs = [t["expr"] for p in lay.panels for t in p.get("targets", [])]
    return metric_names(" ".join(exprs), known)


def _declared_panels(lay: Layout, families: list[flows.MetricFamily]) -> None:
    """A generic panel for each declared family no hand-made panel shows."""
    lay.row("Other components")
    for f in families:
        by = ", ".join(("stage", *f.labels))
        legend = " ".join("{{" + b + "}}" for b in ("stage", *f.labels))
        description = f"{f.help} ({f.name}, declared by a component)"
        if f.kind == "counter":
            lay.panel(f.name, description, [(rate(f.name, None, by), f"{legend}")],
                      unit="suffix:/s")
        elif f.kind == "gauge":
            lay.panel(f.name, description, [(f"max by ({by}) ({f.name}{sel()})", legend)],
                      unit="none")
        else:
            lay.panel(f.name, description, p50_p99(f.name, None, by),
                      unit="s" if f.name.endswith("_seconds") else "none")


def build() -> dict[str, Any]:
    declared = flows.all_metrics()
    lay = Layout()

    lay.row("Flow")
    lay.panel(
        "Actors up",
        "1 while the actor runs (flows_actor_up). A finished finite source shows 0.",
        [(f"max by (stage) (flows_actor_up{sel()})", "{{stage}}")],
        unit="none",
        kind="state-timeline",
        mappings=_value_map({0: ("down", "red"), 1: ("up", "green")}),
        thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}],
    )
    lay.panel(
        "Actor restarts",
        "Restarts by the supervisor in each interval (flows_actor_restarts_total).",
        [(f"sum by (stage) (increase(flows_actor_restarts_total{sel()}[{RATE}]))", "{{stage}}")],
        unit="none",
    )
    lay.panel(
        "Errors by type",
        "Errors per second, by exception class or fixed word (flows_errors_total).",
        [(rate("flows_errors_total", None, "stage, error_type"), "{{stage}} {{error_type}}")],
        unit="suffix:/s",
        stack=True,
    )

    lay.row("Sources")
    lay.panel(
        "Sources: records/s out",
        "Records sent downstream per second (flows_records_sent_total).",
        [(rate("flows_records_sent_total", "source"), "{{stage}}")],
        unit="suffix:rec/s",
    )
    _core_panels(lay, "source", "Sources")
    lay.panel(
        "Sources: lag p50 / p99",
        "Exchange timestamp to the batch being sent (flows_source_lag_seconds).",
        p50_p99("flows_source_lag_seconds", "source"),
        unit="s",
    )
    lay.panel(
        "Sources: poll-cycle time p50 / p99",
        "Time to refresh the whole symbol set once (flows_source_poll_cycle_seconds).",
        p50_p99("flows_source_poll_cycle_seconds", "source"),
        unit="s",
    )
    lay.panel(
        "Sources: freshness",
        "Seconds since each source last sent a valid record "
        "(flows_source_last_record_age_seconds) against its stale_after "
        "(flows_source_stale_after_seconds): above it, /readyz answers 503 (stale).",
        [
            (f"max by (stage) (flows_source_last_record_age_seconds{sel('source')})",
             "{{stage}} age"),
            (f"max by (stage) (flows_source_stale_after_seconds{sel('source')})",
             "{{stage}} stale_after"),
        ],
        unit="s",
    )
    lay.panel(
        "Sources: stale symbols",
        "Symbols whose last valid record is older than stale_after "
        "(flows_source_stale_symbols), out of those seen (flows_source_symbols), and "
        "symbols parked as unknown to the API (flows_source_parked_symbols: never seen, "
        "so never stale). /status and flows.top name the stalest, /status the parked.",
        [
            (f"max by (stage) (flows_source_stale_symbols{sel('source')})", "{{stage}} stale"),
            (f"max by (stage) (flows_source_symbols{sel('source')})", "{{stage}} seen"),
            (f"max by (stage) (flows_source_parked_symbols{sel('source')})",
             "{{stage}} parked"),
        ],
        unit="short",
    )
    lay.panel(
        "Sources: gaps by reason",
        "Gaps in each source's feed per hour, by reason (flows_gaps_total): lost "
        "connections, silences, lost updates, failed polls, open circuits. Each is a Gap "
        "record in flow.gaps() and in /status.",
        [(f"3600 * {rate('flows_gaps_total', 'source', 'stage, reason')}",
          "{{stage}} {{reason}}")],
        unit="short",
    )
    lay.panel(
        "HTTP sources: request latency by endpoint p50 / p99",
        "Time one request took, by endpoint (flows_source_request_seconds).",
        p50_p99("flows_source_request_seconds", "source", "stage, endpoint"),
        unit="s",
    )
    lay.panel(
        "HTTP sources: responses by status class",
        "Responses per second by status class: 2xx, 4xx, 429, 5xx, error "
        "(flows_source_responses_total).",
        [(rate("flows_source_responses_total", "source", "stage, status_class"),
          "{{stage}} {{status_class}}")],
        unit="reqps",
        stack=True,
    )
    lay.panel(
        "HTTP sources: rate-limit waits",
        "Seconds per second requests waited for the rate limiter, and the p99 wait "
        "of one request (flows_source_rate_limit_wait_seconds).",
        [
            (rate("flows_source_rate_limit_wait_seconds_sum", "source"), "{{stage}} s/s"),
            (quantile(0.99, "flows_source_rate_limit_wait_seconds", "source"), "{{stage}} p99"),
        ],
        unit="s",
    )
    lay.panel(
        "HTTP sources: shared rate budget",
        "Pollers on one shared rate budget (--rate-budget): seconds per second requests "
        "waited for their slot and the p99 wait (flows_source_budget_wait_seconds), and "
        "pauses per minute set by another process (429/418, usage headers) that this one "
        "obeyed (flows_source_budget_pauses_total).",
        [
            (rate("flows_source_budget_wait_seconds_sum", "source"), "{{stage}} s/s"),
            (quantile(0.99, "flows_source_budget_wait_seconds", "source"), "{{stage}} p99"),
            (f"60 * {rate('flows_source_budget_pauses_total', 'source')}",
             "{{stage}} pauses/min from others"),
        ],
        unit="s",
    )
    lay.panel(
        "HTTP sources: rate budget fallback",
        "1 while Redis is unreachable and the source runs on its local share, limit / N "
        "(flows_source_budget_fallback); /readyz then answers 503 'degraded'.",
        [(f"max by (instance, stage) (flows_source_budget_fallback{sel('source')})",
          "{{instance}} {{stage}}")],
        unit="none",
        kind="state-timeline",
        mappings=_value_map({0: ("shared", "green"), 1: ("local share", "orange")}),
        thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1}],
    )
    lay.panel(
        "HTTP sources: retries",
        "Requests retried per second (flows_source_retries_total).",
        [(rate("flows_source_retries_total", "source"), "{{stage}}")],
        unit="reqps",
    )
    lay.panel(
        "HTTP sources: circuit state",
        "Circuit breaker state (flows_source_circuit_state): closed, half-open, open. "
        "An open circuit makes /readyz answer 503.",
        [(f"max by (stage) (flows_source_circuit_state{sel('source')})", "{{stage}}")],
        unit="none",
        kind="state-timeline",
        mappings=_value_map({0: ("closed", "green"), 1: ("half-open", "orange"), 2: ("open", "red")}),
        thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 1},
                    {"color": "red", "value": 2}],
    )
    lay.panel(
        "HTTP sources: daily credits",
        "Credits left today at sources with a daily budget, such as LiveCoinWatch "
        "(flows_source_credits_remaining), and credits spent per minute "
        "(flows_source_credits_spent_total).",
        [
            (f"min by (stage) (flows_source_credits_remaining{sel('source')})", "{{stage}} left"),
            (f"60 * {rate('flows_source_credits_spent_total', 'source')}", "{{stage}} spent/min"),
        ],
        unit="none",
    )
    lay.panel(
        "HTTP sources: skipped as fresh",
        "Symbols a daily sync skipped because it fetched them within its max_age "
        "(flows_source_skipped_total, per sync): calls saved.",
        [(f"sum by (stage) (increase(flows_source_skipped_total{sel('source')}[{RATE}]))",
          "{{stage}}")],
        unit="none",
    )
    lay.panel(
        "HTTP sources: adaptive polling",
        "Requests per second an adaptive schedule saves against fixed polling "
        "(flows_source_requests_saved_total), and the p50 / p99 time between two polls of one "
        "symbol (flows_source_poll_interval_seconds).",
        [
            (rate("flows_source_requests_saved_total", "source"), "{{stage}} saved req/s"),
            *p50_p99("flows_source_poll_interval_seconds", "source"),
        ],
        unit="short",
    )
    lay.panel(
        "HTTP sources: detection delay p50 / p99",
        "From a price change at the exchange to the answer that showed it, where the exchange "
        "times its prices (flows_source_detection_delay_seconds).",
        p50_p99("flows_source_detection_delay_seconds", "source"),
        unit="s",
    )

    lay.panel(
        "Stream sources: messages and reconnects",
        "Websocket messages per second (flows_source_messages_total) and reconnects "
        "per minute by reason (flows_source_reconnects_total).",
        [
            (rate("flows_source_messages_total", "source"), "{{stage}} msg/s"),
            (f"60 * {rate('flows_source_reconnects_total', 'source', 'stage, reason')}",
             "{{stage}} reconnects/min {{reason}}"),
        ],
        unit="short",
    )
    lay.panel(
        "Stream sources: connection uptime and gaps",
        "Age of the youngest connection (flows_source_connection_uptime_seconds, 0 while "
        "one is down) and sequence gaps per minute (flows_source_gaps_total).",
        [
            (f"max by (stage) (flows_source_connection_uptime_seconds{sel('source')})",
             "{{stage}} uptime"),
            (f"60 * {rate('flows_source_gaps_total', 'source')}", "{{stage}} gaps/min"),
        ],
        unit="s",
    )

    lay.row("Stages")
    lay.panel(
        "Stages: records/s in / out",
        "Records taken from the inbox and sent downstream per second "
        "(flows_records_received_total, flows_records_sent_total).",
        [
            (rate("flows_records_received_total", "stage"), "{{stage}} in"),
            (rate("flows_records_sent_total", "stage"), "{{stage}} out"),
        ],
        unit="suffix:rec/s",
    )
    _core_panels(lay, "stage", "Stages")

    lay.row("Sinks")
    lay.panel(
        "Sinks: records/s in / written",
        "Records taken from the inbox, and records written by storing sinks, per second "
        "(flows_records_received_total, flows_sink_batch_records).",
        [
            (rate("flows_records_received_total", "sink"), "{{stage}} in"),
            (rate("flows_sink_batch_records_sum", "sink"), "{{stage}} written"),
        ],
        unit="suffix:rec/s",
    )
    _core_panels(lay, "sink", "Sinks")
    lay.panel(
        "Sinks: write latency p50 / p99",
        "Time one successful write took (flows_sink_write_seconds).",
        p50_p99("flows_sink_write_seconds", "sink"),
        unit="s",
    )
    lay.panel(
        "Sinks: batch size (mean / p99)",
        "Records per write (flows_sink_batch_records).",
        [
            ((f"{rate('flows_sink_batch_records_sum', 'sink')} / "
              f"{rate('flows_sink_batch_records_count', 'sink')}"), "{{stage}} mean"),
            (quantile(0.99, "flows_sink_batch_records", "sink"), "{{stage}} p99"),
        ],
        unit="none",
    )
    lay.panel(
        "Sinks: write errors",
        "Writes that failed, per second (flows_sink_write_errors_total).",
        [(rate("flows_sink_write_errors_total", "sink"), "{{stage}}")],
        unit="suffix:/s",
    )
    lay.panel(
        "Sinks: write retries",
        "Writes retried after a failure, per second (flows_sink_retries_total).",
        [(rate("flows_sink_retries_total", "sink"), "{{stage}}")],
        unit="suffix:/s",
    )
    lay.panel(
        "Sinks: end-to-end latency p50 / p99",
        "From the source making a batch to the sink having written it "
        "(flows_end_to_end_latency_seconds).",
        p50_p99("flows_end_to_end_latency_seconds", "sink"),
        unit="s",
    )

    lay.row("Slow operations")
    lay.panel(
        "Slow batches",
        "Batches whose processing crossed the flow's SlowThresholds, by severity "
        "(flows_slow_batches_total).",
        [(f"sum by (stage, severity) (increase(flows_slow_batches_total{sel()}[{RATE}]))",
          "{{stage}} {{severity}}")],
        unit="none",
        stack=True,
    )
    lay.panel(
        "Slow poll cycles",
        "Source poll cycles that crossed the flow's SlowThresholds, by severity "
        "(flows_slow_poll_cycles_total).",
        [(f"sum by (stage, severity) (increase(flows_slow_poll_cycles_total{sel()}[{RATE}]))",
          "{{stage}} {{severity}}")],
        unit="none",
        stack=True,
    )

    unknown = _queried(lay, declared) - set(declared)
    if unknown:
        raise SystemExit(f"dashboards/generate.py queries undeclared metrics: {sorted(unknown)}")
    missing = [f for name, f in declared.items() if name not in _queried(lay, declared)]
    if missing:
        _declared_panels(lay, missing)

    return {
        "__inputs": [{
            "name": "DS_PROMETHEUS",
            "label": "Prometheus",
            "description": "The Prometheus that scrapes your flows",
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "9.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
            {"type": "panel", "id": "state-timeline", "name": "State timeline", "version": ""},
        ],
        "annotations": {"list": [{
            "builtIn": 1,
            "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True,
            "hide": True,
            "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts",
            "type": "dashboard",
        }]},
        "description": "flows: per-stage throughput, latency, backpressure and errors "
                       "(see docs/operations/observing.md)",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "links": [],
        "liveNow": False,
        "panels": lay.panels,
        "refresh": "10s",
        "schemaVersion": 36,
        "style": "dark",
        "tags": ["flows", "prometheus"],
        "templating": {"list": _variables()},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "flows",
        "uid": "flows-overview",
        "version": 1,
        "weekStart": "",
    }


def _query_var(name: str, query: str, *, regex: str = "", hide: int = 0,
               multi: bool = False, label: str | None = None) -> dict[str, Any]:
    var: dict[str, Any] = {
        "current": {},
        "datasource": DS,
        "definition": query,
        "hide": hide,
        "includeAll": multi,
        "label": label or name,
        "multi": multi,
        "name": name,
        "options": [],
        "query": {"query": query, "refId": "StandardVariableQuery"},
        "refresh": 2,
        "regex": regex,
        "skipUrlSync": False,
        "sort": 1,
        "type": "query",
    }
    if multi:
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return var


STAGE_REGEX = '/stage="([^"]+)"/'


def _variables() -> list[dict[str, Any]]:
    f = 'flow=~"$flow"'
    sinks = f"max by (stage) (flows_end_to_end_latency_seconds_count{{{f}}}) > 0"
    return [
        {
            "current": {"selected": False, "text": "Prometheus", "value": "${DS_PROMETHEUS}"},
            "hide": 0,
            "includeAll": False,
            "label": "Data source",
            "multi": False,
            "name": "datasource",
            "options": [],
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "skipUrlSync": False,
            "type": "datasource",
        },
        _query_var("flow", "label_values(flows_records_sent_total, flow)", label="Flow"),
        _query_var(
            "source",
            f"query_result(max by (stage) (flows_records_sent_total{{{f}}}) unless on (stage) "
            f"max by (stage) (flows_channel_capacity_batches{{{f}}}))",
            regex=STAGE_REGEX, hide=2, multi=True,
        ),
        _query_var(
            "stage",
            f"query_result(max by (stage) (flows_channel_capacity_batches{{{f}}}) unless on "
            f"(stage) ({sinks}))",
            regex=STAGE_REGEX, hide=2, multi=True,
        ),
        _query_var("sink", f"query_result({sinks})", regex=STAGE_REGEX, hide=2, multi=True),
    ]


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
