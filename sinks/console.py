"""Console sink: print records, or a periodic per-stage summary of the flow.

Talks to standard output. In ``summary`` mode (the default) it prints,
every ``every`` seconds, one line per actor of its flow: records in and
out, records/s, drops by reason, and p50/p99 batch processing time, read
from the flow's own metrics. In ``records`` mode it prints each record.

Example::

    Flow("demo", sources=[SyntheticMarket()], stages=[ChangeDetector()],
         sinks=[ConsoleSink(every=5.0)])
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal, TextIO

import trio

from flows import ComponentMetrics, Inbox, flow_figures, histogram_quantile

__all__ = ["ConsoleSink", "format_summary"]


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.2f}ms"


def format_summary(
    metrics: ComponentMetrics, previous: dict[str, float], elapsed: float
) -> list[str]:
    """Summary lines for the flow ``metrics`` belongs to; updates ``previous``."""
    figs = flow_figures(metrics.flow_metrics, metrics.flow)
    lines = [f"-- flow {metrics.flow} at {time.strftime('%H:%M:%S')} --"]
    for c in metrics.flow_metrics.components:
        if c.flow != metrics.flow:
            continue
        f = figs.get(c.stage, {"discarded": {}, "histograms": {}})
        count_in = f.get("received", 0.0) if c.kind != "source" else f.get("sent", 0.0)
        rate = (count_in - previous.get(c.stage, 0.0)) / elapsed if elapsed > 0 else 0.0
        previous[c.stage] = count_in
        h = f["histograms"].get("processing", {"buckets": []})
        drops = " ".join(f"{k}={int(v)}" for k, v in sorted(f["discarded"].items()))
        written = f["histograms"].get("write_records")
        line = (
            f"{c.kind:6} {c.stage:14} in={int(count_in):>9} ({rate:>9.0f}/s)"
            f" out={int(f.get('sent', 0)):>9}"
            f" p50={_ms(histogram_quantile(0.5, h['buckets'])):>9}"
            f" p99={_ms(histogram_quantile(0.99, h['buckets'])):>9}"
        )
        if written is not None and written["count"]:
            line += f" written={int(written['sum'])}"
        if drops:
            line += f" dropped[{drops}]"
        lines.append(line)
    return lines


class ConsoleSink:
    """Sink: print a periodic flow summary, or every record.

    Parameters:
        mode: ``summary`` (default) or ``records``.
        every: seconds between summaries.
        stream: where to print (default: standard output).
        name: the actor's name.
    """

    def __init__(
        self,
        *,
        mode: Literal["summary", "records"] = "summary",
        every: float = 5.0,
        stream: TextIO | None = None,
        name: str = "console",
    ) -> None:
        if mode not in ("summary", "records"):
            raise ValueError(f"mode must be 'summary' or 'records', not {mode!r}")
        if not every > 0:
            raise ValueError("every must be > 0")
        self.mode, self.every, self.name = mode, every, name
        self._stream = stream

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    def _print(self, lines: list[str]) -> None:
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    async def run(self, inbox: Inbox) -> None:
        m = inbox.metrics
        previous: dict[str, float] = {}
        last = time.monotonic()
        next_at = trio.current_time() + self.every
        while True:
            with trio.move_on_at(next_at):
                try:
                    batch = await inbox.receive()
                except trio.EndOfChannel:
                    break
                if self.mode == "records":
                    self._print([_record_line(r) for r in batch.records])
                m.end_to_end.observe(max(time.monotonic() - batch.created, 0.0))
                batch.ack("written")
                continue
            if self.mode == "summary":
                now = time.monotonic()
                self._print(format_summary(m, previous, now - last))
                last = now
            next_at = trio.current_time() + self.every
        if self.mode == "summary":
            self._print(format_summary(m, previous, time.monotonic() - last))


def _record_line(r: Any) -> str:
    if hasattr(r, "symbol") and hasattr(r, "price"):
        return f"{r.ts:.3f} {r.source} {r.symbol} {r.price}"
    return repr(r)
