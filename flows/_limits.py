"""Rate limiting and circuit breaking for sources that call remote APIs.

``RateLimiter`` keeps a source at or under an API's documented limits: it
spaces requests evenly (``window / limit`` seconds per unit of weight) and
keeps a sliding log so no ``window``-long interval ever holds more than
``limit`` units, which also satisfies APIs that count per fixed window. The
API's own signals tighten it at run time: ``pause_until`` (429/418 with
Retry-After) stops every request until then, and ``observe_usage`` (e.g.
Binance's X-MBX-USED-WEIGHT-1M) pauses to the end of the window when other
clients on the same IP used most of the budget.

``CircuitBreaker`` stops calling an API that keeps failing: after
``failures`` failed requests in a row it opens for ``reset_after`` seconds,
then lets one probe through (half-open); a success closes it, a failure
opens it again.
"""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar

import attrs
import trio

__all__ = ["CircuitBreaker", "RateLimit", "RateLimiter"]


@attrs.frozen
class RateLimit:
    """At most ``limit`` units (requests, or weight) per ``window`` seconds."""

    limit: float = attrs.field(validator=attrs.validators.gt(0))
    window: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))


class RateLimiter:
    """Paces requests under one or more ``RateLimit`` s (all must hold).

    ``share`` of each limit is used (default 98%): servers count a request
    when it arrives, after a varying network delay, so pacing at exactly
    100% earns the occasional 429 (measured in bench/polling.py).
    """

    def __init__(
        self, limits: list[RateLimit] | tuple[RateLimit, ...], *, share: float = 0.98
    ) -> None:
        if not 0 < share <= 1:
            raise ValueError("share must be in (0, 1]")
        self.declared = tuple(limits)
        self.limits = tuple(RateLimit(lim.limit * share, lim.window) for lim in limits)
        self._next = -math.inf  # earliest start of the next request, per spacing
        self._logs: list[deque[tuple[float, float]]] = [deque() for _ in self.limits]
        self._paused_until = -math.inf
        self._lock = trio.Lock()

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def pause_until(self, deadline: float) -> None:
        """Send nothing before ``deadline`` (trio time), e.g. after a 429."""
        self._paused_until = max(self._paused_until, deadline)

    def observe_usage(self, used: float, limit: float, window_end: float) -> None:
        """The API says ``used`` of ``limit`` is spent in a window ending at
        ``window_end`` (trio time): pause until then if little is left and
        others (other clients on the same IP) spent part of it: our own
        usage is already paced."""
        if used < 0.9 * limit:
            return
        own = 0.0
        if self._logs:
            now, window = trio.current_time(), self.limits[0].window
            own = sum(w for t, w in self._logs[0] if t > now - window)
        if used > own + 0.05 * limit:
            self.pause_until(window_end)

    def _ready_at(self, weight: float, now: float) -> float:
        at = max(now, self._next, self._paused_until)
        for limit, log in zip(self.limits, self._logs):
            while log and log[0][0] <= now - limit.window:
                log.popleft()
            used = sum(w for _, w in log)
            if used + weight > limit.limit and log:
                # wait until enough of the oldest entries leave the window
                spare = used + weight - limit.limit
                for t, w in log:
                    spare -= w
                    if spare <= 0:
                        at = max(at, t + limit.window)
                        break
                else:  # a request heavier than the spare budget: wait for an empty window
                    at = max(at, log[-1][0] + limit.window)
        return at

    def ready_at(self, weight: float = 1.0) -> float:
        """Trio time from which a request of ``weight`` could start (takes nothing)."""
        return self._ready_at(weight, trio.current_time())

    async def acquire(self, weight: float = 1.0) -> float:
        """Wait until a request of ``weight`` may start; returns seconds waited."""
        start = trio.current_time()
        async with self._lock:
            while True:
                now = trio.current_time()
                at = self._ready_at(weight, now)
                if at <= now:
                    break
                await trio.sleep_until(at)
            spacing = max((weight * lim.window / lim.limit for lim in self.limits), default=0.0)
            # Measured from when this request was due, not from when the
            # task woke up: late wake-ups must not lower the long-run rate.
            self._next = max(now - spacing, self._next) + spacing
            for log in self._logs:
                log.append((now, weight))
        return trio.current_time() - start


@attrs.define
class CircuitBreaker:
    """Closed / open / half-open breaker for one API.

    Parameters:
        failures: failed requests in a row that open the circuit.
        reset_after: seconds the circuit stays open before a probe.
    """

    failures: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    reset_after: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    state: str = attrs.field(default="closed", init=False)
    _failed: int = attrs.field(default=0, init=False)
    _opened_at: float = attrs.field(default=-math.inf, init=False)
    _probing: bool = attrs.field(default=False, init=False)
    _changed: trio.Event = attrs.field(factory=trio.Event, init=False)

    STATES: ClassVar[dict[str, int]] = {"closed": 0, "half_open": 1, "open": 2}

    def allow(self) -> bool:
        """Whether a request may go out now (a half-open circuit lets one probe)."""
        if self.state == "closed":
            return True
        if self.state == "open" and trio.current_time() >= self._opened_at + self.reset_after:
            self._set("half_open")
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def reopens_at(self) -> float:
        """Trio time at which an open circuit lets a probe through."""
        return self._opened_at + self.reset_after

    def success(self) -> None:
        """A request was answered: the circuit closes."""
        self._failed = 0
        self._probing = False
        if self.state != "closed":
            self._set("closed")
        self._wake()

    def failure(self) -> None:
        """A request failed: a half-open circuit (its probe failed) or
        ``failures`` in a row open it."""
        self._failed += 1
        self._probing = False
        if self.state == "half_open" or self._failed >= self.failures:
            self._opened_at = trio.current_time()
            if self.state != "open":
                self._set("open")
        self._wake()

    def answered(self) -> None:
        """The API answered, but not with data (rate limited): a half-open
        probe succeeded (the API is up; pacing is the limiter's business); a
        closed circuit's failure count is left as it is."""
        if self.state == "closed":
            self._wake()
        else:
            self.success()

    def release(self) -> None:
        """A probe ended without an answer either way (cancelled): let
        another one through."""
        if self._probing:
            self._probing = False
            self._wake()

    async def wait_changed(self) -> None:
        """Wait for the next state change or probe outcome."""
        await self._changed.wait()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _set(self, state: str) -> None:
        self.state = state
        self._wake()
