"""Gaps: where a feed was incomplete, counted, logged, kept, and streamed.

Sources report a gap with ``outbox.gap(symbols, start, end, reason)``. The
runtime's ``GapLog`` counts it (``flows_gaps_total{reason}`` on the
source), logs it (at most ``burst`` lines a minute per source; the others
are summed into the next line), keeps the last ``keep`` for ``/status``,
and, when the flow reads ``flow.gaps()``, sends it down that stream as a
``Gap`` record, so stored data can say where it is incomplete.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import trio

from ._records import Batch, Gap

__all__ = ["GapLog", "GapStream", "WallClock"]

log = logging.getLogger("flows.gaps")


class WallClock:
    """Epoch seconds that advance with trio's clock (so a gap measured under
    a test's MockClock has its virtual length). Make one per run."""

    def __init__(self) -> None:
        self._offset = time.time() - trio.current_time()

    def now(self) -> float:
        return self._offset + trio.current_time()


class GapStream:
    """The source behind ``flow.gaps()``: every gap the flow's sources report,
    as ``Gap`` records. It ends when the other sources have."""

    def __init__(self, *, name: str = "gaps", capacity: int = 1000) -> None:
        self.name = name
        self.capacity = capacity
        self._send: trio.MemorySendChannel[Gap] | None = None
        self._receive: trio.MemoryReceiveChannel[Gap] | None = None

    def setup(self, context: Any) -> None:
        self._send, self._receive = trio.open_memory_channel(self.capacity)

    def offer(self, gap: Gap) -> bool:
        """Queue ``gap``; False when the stream is full or closed (then counted as dropped)."""
        if self._send is None:
            return False
        try:
            self._send.send_nowait(gap)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        if self._send is not None:
            self._send.close()

    async def run(self, outbox: Any) -> None:
        assert self._receive is not None, "setup() was not called"
        async for gap in self._receive:
            gaps = [gap]
            while True:
                try:
                    gaps.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await outbox.send(Batch(gaps))


class GapLog:
    """The runtime's record of gaps."""

    def __init__(self, flow: str, *, keep: int = 50, burst: int = 10) -> None:
        self.flow = flow
        self.recent: deque[Gap] = deque(maxlen=keep)
        self.counts: dict[str, int] = {}
        self.stream: GapStream | None = None
        self._burst = burst
        self._window: dict[str, deque[float]] = {}
        self._suppressed: dict[str, int] = {}

    def record(self, gap: Gap, metrics: Any) -> None:
        """Count, log, keep and stream ``gap`` (reported by ``metrics``' component)."""
        metrics.labeled("flows_gaps_total", gap.reason).inc()
        self.counts[gap.reason] = self.counts.get(gap.reason, 0) + 1
        self.recent.append(gap)
        self._log(gap)
        if self.stream is not None and not self.stream.offer(gap):
            metrics.discarded("gap_stream_full")

    def _log(self, gap: Gap) -> None:
        now = time.monotonic()
        window = self._window.setdefault(gap.source, deque())
        while window and window[0] < now - 60.0:
            window.popleft()
        if len(window) >= self._burst:
            self._suppressed[gap.source] = self._suppressed.get(gap.source, 0) + 1
            return
        window.append(now)
        more = self._suppressed.pop(gap.source, 0)
        what = "all symbols" if gap.symbols is None else (
            ", ".join(gap.symbols[:5]) + (f" and {len(gap.symbols) - 5} more" if len(gap.symbols) > 5 else "")
        )
        log.warning(
            "flow %s: gap in %s (%s): %s for %.1fs%s", self.flow, gap.source, gap.reason, what,
            max(gap.end - gap.start, 0.0), f" (+{more} gaps not logged)" if more else "",
            extra={"flow": self.flow, "stage": gap.source, "reason": gap.reason},
        )

    def figures(self) -> dict[str, Any]:
        """The ``gaps`` entry of /status."""
        return {
            "total": dict(self.counts),
            "recent": [
                {"source": g.source, "symbols": None if g.symbols is None else list(g.symbols),
                 "start": g.start, "end": g.end, "reason": g.reason}
                for g in reversed(self.recent)
            ],
        }
