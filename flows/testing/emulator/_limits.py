"""Rate limiters, as the real APIs count: configs (msgspec Structs) and their state.

- ``WeightLimit``: Binance. Request weight summed over fixed windows
  (``window`` seconds, aligned on trio's clock); over ``limit`` -> 429 with
  ``Retry-After`` (seconds to the window's end); after ``ban_after`` 429s
  in one window the next request over the limit starts a ban: 418 with
  ``Retry-After`` until the ban ends. Bans double for repeat offenders
  (``ban_seconds`` first, at most ``ban_max_seconds``), as Binance's scale
  "from 2 minutes to 3 days". Refused requests still count their weight.
- ``TokenBucket``: Coinbase (lazy-fill bucket: ``burst`` tokens, refilled
  at ``rate`` per second) and Kraken's public API (about 1 per second).
- ``WindowLimit``: at most ``limit`` requests per fixed ``window``
  (CoinGecko per minute, OKX per 2 seconds, CoinCap per minute).

All times come from trio's clock, so tests can use ``MockClock``.
"""

from __future__ import annotations

import math
from typing import Annotated

import attrs
import msgspec

__all__ = [
    "Limiter",
    "RateLimit",
    "TokenBucket",
    "Verdict",
    "WeightLimit",
    "WindowLimit",
]

_Pos = Annotated[float, msgspec.Meta(gt=0)]
_PosInt = Annotated[int, msgspec.Meta(ge=1)]


class WeightLimit(
    msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, tag="weight"
):
    """Binance's ``REQUEST_WEIGHT`` limit with 429 -> 418 escalation."""

    limit: _PosInt = 6000
    window: _Pos = 60.0
    ban_after: _PosInt = 3
    ban_seconds: _Pos = 120.0
    ban_max_seconds: _Pos = 259200.0


class TokenBucket(
    msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, tag="bucket"
):
    """``burst`` requests at once, refilled at ``rate`` per second."""

    rate: _Pos = 10.0
    burst: _Pos = 15.0


class WindowLimit(
    msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, tag="window"
):
    """At most ``limit`` requests per fixed window of ``window`` seconds."""

    limit: _PosInt = 30
    window: _Pos = 60.0


RateLimit = WeightLimit | TokenBucket | WindowLimit


@attrs.frozen
class Verdict:
    """A limiter's answer. ``status`` is 200 (go on), 429 or 418;
    ``retry_after`` whole seconds (0 when allowed); ``used`` the weight
    used in the current window (``WeightLimit`` only)."""

    status: int
    retry_after: int = 0
    used: int = 0
    banned_until: float = 0.0  # trio time


def _ceil_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds - 1e-9))


class Limiter:
    """The state of one exchange's limiter."""

    def __init__(self, config: RateLimit | None) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._window_start = -math.inf
        self._used = 0
        self._rejected = 0
        self._banned_until = -math.inf
        self._bans = 0
        self._tokens = (
            self.config.burst if isinstance(self.config, TokenBucket) else 0.0
        )
        self._filled_at: float | None = None

    def used(self, now: float) -> int:
        """Weight (or requests) counted in the window containing ``now``."""
        self._roll(now)
        return self._used

    def _roll(self, now: float) -> None:
        config = self.config
        if isinstance(config, (WeightLimit, WindowLimit)):
            start = math.floor(now / config.window) * config.window
            if start != self._window_start:
                self._window_start = start
                self._used = 0
                self._rejected = 0

    def check(self, now: float, cost: int = 1) -> Verdict:
        """Count one request of weight ``cost`` at trio time ``now``."""
        config = self.config
        if config is None:
            return Verdict(200)
        if isinstance(config, TokenBucket):
            if self._filled_at is not None:
                elapsed = max(0.0, now - self._filled_at)
                self._tokens = min(config.burst, self._tokens + elapsed * config.rate)
            self._filled_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return Verdict(200)
            return Verdict(
                429, retry_after=_ceil_seconds((1.0 - self._tokens) / config.rate)
            )
        self._roll(now)
        window_end = self._window_start + config.window
        if isinstance(config, WindowLimit):
            if self._used + 1 > config.limit:
                return Verdict(
                    429, retry_after=_ceil_seconds(window_end - now), used=self._used
                )
            self._used += 1
            return Verdict(200, used=self._used)
        # WeightLimit
        if now < self._banned_until:
            return Verdict(
                418,
                retry_after=_ceil_seconds(self._banned_until - now),
                used=self._used,
                banned_until=self._banned_until,
            )
        self._used += cost
        if self._used <= config.limit:
            return Verdict(200, used=self._used)
        if self._rejected >= config.ban_after:
            seconds = min(config.ban_seconds * 2**self._bans, config.ban_max_seconds)
            self._bans += 1
            self._banned_until = now + seconds
            return Verdict(
                418,
                retry_after=_ceil_seconds(seconds),
                used=self._used,
                banned_until=self._banned_until,
            )
        self._rejected += 1
        return Verdict(
            429, retry_after=_ceil_seconds(window_end - now), used=self._used
        )
