"""The one retry policy: exponential backoff with full jitter.

Every part of flows that tries again after a failure takes a ``Retry``:
HTTP requests (``HttpSource(retry=...)``), websocket reconnects
(``WebSocketSource(retry=...)``), storing sinks (``BatchingSink(retry=...)``)
and the Redis stream source (``RedisStreamSource(retry=...)``). Each user
has its own default; the formula and the meaning of each field are the same
everywhere.

The wait before retry *n* (counting from 0) is drawn from
``uniform(0, min(max_backoff, backoff * 2**n))`` ("full jitter": clients
that failed together do not come back together). ``attempts`` counts every
try, the first included: ``attempts=1`` never retries, ``None`` retries
forever. ``delays()`` gives the waits of one run of tries; a user starts a
new run (back to ``backoff``) after a success.

Example::

    policy = Retry(attempts=4, backoff=0.2, max_backoff=5.0)
    for delay in policy.delays():   # at most 3 waits: 0-0.2 s, 0-0.4 s, 0-0.8 s
        ...
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import attrs

__all__ = ["Retry"]

_MAX_EXPONENT = 1000  # 2.0**1024 overflows; the cap is reached long before


@attrs.frozen(kw_only=True)
class Retry:
    """Retry policy: exponential backoff with full jitter.

    All parameters are keyword-only.

    Parameters:
        attempts: tries in all, the first included (``None``: forever).
        backoff: the longest wait before the first retry (s).
        max_backoff: no wait is longer than this (s).
    """

    attempts: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(1))
    )
    backoff: float = attrs.field(default=0.1, validator=attrs.validators.ge(0))
    max_backoff: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))

    def __attrs_post_init__(self) -> None:
        if self.max_backoff < self.backoff:
            raise ValueError(
                f"Retry: max_backoff ({self.max_backoff}) must be >= backoff ({self.backoff})"
            )

    def cap(self, n: int) -> float:
        """The longest wait before retry ``n`` (from 0): ``min(max_backoff, backoff * 2**n)``."""
        return min(self.max_backoff, self.backoff * 2.0 ** min(n, _MAX_EXPONENT))

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """The wait before each retry of one run of tries, in order; ends
        when ``attempts`` are used up (never, with ``None``). ``rng``: the
        random source (default: the ``random`` module)."""
        uniform = (rng or random).uniform
        n = 0
        while self.attempts is None or n < self.attempts - 1:
            yield uniform(0, self.cap(n))
            n += 1
