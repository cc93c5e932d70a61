"""One rate budget shared by several processes, through Redis.

Exchanges limit per IP, not per process: N pollers on one host (``--shard
k/N``) that each pace themselves send up to N times the limit. A
``RateBudget`` names a Redis server that holds the budget instead; every
process polling the same API from the same host takes its requests from it.

How it works (``SharedRateLimiter``, a drop-in for ``RateLimiter``):

- Slots, atomically on the server: one Lua script (GCRA, no burst) keeps a
  theoretical arrival time per limit; a request of weight ``w`` reserves
  the next slot free under every limit at once and moves each limit's time
  on by ``w * window / limit``, so no ``window`` ever holds more than the
  limit's weight (times ``share``, 98%). Server time (``TIME``), so the
  processes' clocks do not matter. A process holds one reservation at a
  time, so a stalled process sends one late request, not a burst.
- Fair shares: each process also has its own pace, its part of the budget
  in proportion to its ``demand`` (an HTTP source's number of symbols)
  among the processes that hold one: those that asked for a slot in the
  last ``idle_after`` seconds, and those not heard from for three
  heartbeats (they may be on their local share). While slots are queued,
  a process ahead of its pace waits; a slot free now goes to whoever
  asks. When all are busy each gets its part (every shard then cycles in
  about the same time, N / R for the whole universe); a process alone, or
  with idle peers, gets the whole budget.
- Members: each process heartbeats (``probe_every``) into a sorted set. The
  budget is shared by those seen in the last ``member_ttl`` seconds; the
  ``processes`` expected (``N`` of ``--shard k/N``) minus those seen are
  assumed to run on their local share, so the members use only
  ``seen / N`` of the limit: the sum never exceeds it, also while a process
  cannot reach Redis or is rejoining.
- Pause: a 429/418 with ``Retry-After`` writes a pause time that every
  reservation respects; a process that slept longer than ``recheck_after``
  for its slot reads the pause again before sending.
- Usage view: the weight the processes reserved is counted on the server
  in tenths of each window; a usage header (``observe_usage``) pauses
  everyone to the window's end only when the API counted clearly more
  (5% of the limit) than all the sharing processes together sent in the
  last window (its last 11 tenths: never less than the API's own window
  holds of ours, however it is aligned).
- Fallback: when Redis does not answer (an error, or ``timeout``), the
  process switches to a local share (``LocalShare``: ``1 / processes`` of
  each limit, evenly spaced), reports ``degraded`` on /readyz and keeps
  probing; once Redis answers again and the requests it queued on the
  local share have gone, it rejoins the shared budget (joining earlier
  would hand its part to the others while those still go out). It
  starts on the local share only once the others reserve its part for it
  (``3 * probe_every`` after Redis last answered it).

Keys (``{flows:budget:KEY}:state`` hash, ``:members`` and ``:busy`` sorted
sets, ``:usage`` and ``:pace`` hashes) expire on their own when nobody uses
them.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import attrs
import trio

from ._limits import RateLimit
from ._metrics import LATENCY_BUCKETS, MetricFamily
from ._redact import redact

__all__ = ["BUDGET_METRICS", "RateBudget", "SharedRateLimiter", "attached", "with_budget"]

log = logging.getLogger("flows.budget")

BUDGET_WAIT = MetricFamily(
    "flows_source_budget_wait_seconds", "histogram",
    "At an HTTP source on a shared rate budget: time a request waited for its slot in the "
    "budget (shared pauses included).", buckets=LATENCY_BUCKETS,
)
BUDGET_FALLBACK = MetricFamily(
    "flows_source_budget_fallback", "gauge",
    "At an HTTP source on a shared rate budget: 1 while Redis is unreachable and the source "
    "runs on its local share (limit / processes), else 0.",
)
BUDGET_PAUSES = MetricFamily(
    "flows_source_budget_pauses_total", "counter",
    "At an HTTP source on a shared rate budget: pauses (429/418 Retry-After, usage headers) "
    "set by another process that this one obeyed.",
)
BUDGET_METRICS = (BUDGET_WAIT, BUDGET_FALLBACK, BUDGET_PAUSES)


@attrs.frozen(kw_only=True)
class RateBudget:
    """A rate budget shared through Redis (``--rate-budget URL``).

    Parameters:
        url: the Redis server, ``redis://[:password@]host:port/db``.
        key: the budget's name; processes with the same key share it
            (default: the API's host and the source's limits, e.g.
            ``api.binance.com|6000/60s``).
        processes: how many processes share it; each one's fallback is
            ``1 / processes`` of the limit (default: N of ``--shard k/N``,
            else 1).
        timeout: seconds a Redis call may take before the fallback.
        probe_every: seconds between heartbeats (and probes while Redis is away).
        member_ttl: a process not heard from for this long is taken to run
            on its local share.
        idle_after: a process that asked for no slot for this long (or for
            three of its own intervals, if longer) leaves its part of the
            budget to the busy ones.
        recheck_after: a request that waited longer than this for its slot
            reads the shared pause again before it goes.
    """

    url: str
    key: str | None = None
    processes: int | None = attrs.field(default=None)
    timeout: float = 0.5
    probe_every: float = 0.5
    member_ttl: float = 3.0
    idle_after: float = 1.0
    recheck_after: float = 0.25

    @processes.validator
    def _check_processes(self, _: Any, value: int | None) -> None:
        if value is not None and value < 1:
            raise ValueError("processes must be >= 1")

    def __attrs_post_init__(self) -> None:
        if urlsplit(self.url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"rate budget {redact(self.url)!r}: expected redis://host:port/db")
        if not (self.timeout > 0 and self.probe_every > 0
                and self.member_ttl > 3 * self.probe_every):
            raise ValueError("timeout and probe_every must be > 0, member_ttl > 3 * probe_every")
        redact(self.url, learn=True)

    @classmethod
    def of(cls, value: str | RateBudget) -> RateBudget:
        return value if isinstance(value, RateBudget) else cls(url=value)


# Lua: the time, ARGV "" meaning the server's own clock (tests pass explicit times).
_CLOCK = """
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
"""

# KEYS: state hash, members zset (last contact), usage hash, pace hash
# (demand and own pace of each member), busy zset (last slot asked for).
# ARGV: now ('' = server TIME), member, processes, member_ttl, weight, count,
#       demand, idle_after, fresh, then count x (field, limit, window).
# Returns: {wait seconds, pause (server time), pause_by, members, seconds to the
# pause, this member's part, '1' when nothing was reserved (ask again after
# the wait) else '0'} as strings.
_ACQUIRE = _CLOCK + """
local function num(v) return tonumber(v) or 0 end
local function f6(x) return string.format('%.6f', x) end
local now = clock(ARGV[1])
local me, n, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local weight, count = tonumber(ARGV[5]), tonumber(ARGV[6])
local demand, idle, fresh = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
-- members: those not heard from for ttl (and those missing from n) are on
-- their local share, so the members use members / n of the limit
redis.call('ZADD', KEYS[2], now, me)
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
  redis.call('ZREM', KEYS[5], unpack(gone))
  local drop = {}
  for _, m in ipairs(gone) do
    drop[#drop + 1] = 'd|' .. m
    for i = 0, count - 1 do drop[#drop + 1] = 't|' .. ARGV[10 + 3 * i] .. '|' .. m end
  end
  redis.call('HDEL', KEYS[4], unpack(drop))
end
-- a member is one source; n counts processes (member ids are host:pid:tag)
local procs, members = {}, 0
for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local proc = string.match(m, '^(.+):[^:]*$') or m
  if not procs[proc] then procs[proc] = true; members = members + 1 end
end
local share = math.min(1, members / n)
-- this member's part, by demand, among the members that hold one: those
-- busy (a slot asked for within idle) and those not heard from lately
-- (they may be on their local share); an idle member that heartbeats
-- leaves its part to the others
redis.call('ZADD', KEYS[5], now, me)
redis.call('HSET', KEYS[4], 'd|' .. me, demand)
local total = 0
local seen = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
for k = 1, #seen, 2 do
  local m, last = seen[k], tonumber(seen[k + 1])
  local busy = tonumber(redis.call('ZSCORE', KEYS[5], m) or nil)
  if m == me or (busy and busy >= now - idle) or last < now - fresh then
    total = total + num(redis.call('HGET', KEYS[4], 'd|' .. m))
  end
end
local part = demand / math.max(total, demand)
-- the slot: after the pause and every limit's next free time (no burst).
-- While slots are queued (the next is more than one step away), a member
-- ahead of its own pace (one interval of tolerance) reserves nothing and
-- is told when to ask again; a slot free now goes to whoever asks, so no
-- slot is left unused when a member is late, but only one interval more:
-- a part held for a member on its local share stays unused
local pause = num(redis.call('HGET', KEYS[1], 'pause'))
local start = math.max(now, pause)
local paced = now
local longest, step, interval = ttl, 0, 0
for i = 0, count - 1 do
  local field, limit, window = ARGV[10 + 3 * i], tonumber(ARGV[11 + 3 * i]), tonumber(ARGV[12 + 3 * i])
  local own = weight * window / (limit * share * part)
  start = math.max(start, num(redis.call('HGET', KEYS[1], field)))
  paced = math.max(paced, num(redis.call('HGET', KEYS[4], 't|' .. field .. '|' .. me)) - own)
  longest = math.max(longest, window)
  step = math.max(step, weight * window / (limit * share))
  interval = math.max(interval, own)
end
if paced > start and (start > math.max(now, pause) + step or paced > start + interval) then
  return {f6(paced - now), f6(pause), redis.call('HGET', KEYS[1], 'pause_by') or '',
          tostring(members), f6(pause - now), f6(part), '1'}
end
for i = 0, count - 1 do
  local field, limit, window = ARGV[10 + 3 * i], tonumber(ARGV[11 + 3 * i]), tonumber(ARGV[12 + 3 * i])
  local step = weight * window / (limit * share)
  redis.call('HSET', KEYS[1], field, f6(start + step))
  local mine = 't|' .. field .. '|' .. me
  redis.call('HSET', KEYS[4], mine, f6(math.max(num(redis.call('HGET', KEYS[4], mine)), start) + step / part))
  local bucket = math.floor(start * 10 / window)
  redis.call('HINCRBYFLOAT', KEYS[3], field .. '@' .. string.format('%.0f', bucket), weight)
  local old = {}
  for b = bucket - 30, bucket - 12 do old[#old + 1] = field .. '@' .. string.format('%.0f', b) end
  redis.call('HDEL', KEYS[3], unpack(old))
end
local keep = math.ceil((2 * longest + math.max(0, pause - now)) * 1000)
for k = 1, 5 do redis.call('PEXPIRE', KEYS[k], keep) end
return {f6(start - now), f6(pause), redis.call('HGET', KEYS[1], 'pause_by') or '',
        tostring(members), f6(pause - now), f6(part), '0'}
"""

# KEYS: state hash. ARGV: now, seconds, member. Returns the pause (server time).
_PAUSE = _CLOCK + """
local now = clock(ARGV[1])
local untl = now + tonumber(ARGV[2])
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause')) or 0
if untl > pause then
  redis.call('HSET', KEYS[1], 'pause', string.format('%.6f', untl), 'pause_by', ARGV[3])
  if redis.call('PTTL', KEYS[1]) < (untl - now) * 1000 + 1000 then
    redis.call('PEXPIRE', KEYS[1], math.ceil((untl - now) * 1000) + 60000)
  end
  pause = untl
end
return string.format('%.6f', pause)
"""

# KEYS: state hash, usage hash. ARGV: now, used, limit, seconds to the
# window's end, field, window, member. Returns {paused '1'/'0', ours}: ours
# is what the sharing processes reserved in the last 11 tenths of window.
_USAGE = _CLOCK + """
local now = clock(ARGV[1])
local used, limit, rest = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local window = tonumber(ARGV[6])
local bucket = math.floor(now * 10 / window)
local ours = 0
for b = bucket - 10, bucket do
  ours = ours + (tonumber(redis.call('HGET', KEYS[2], ARGV[5] .. '@' .. string.format('%.0f', b))) or 0)
end
if used >= 0.9 * limit and used > ours + 0.05 * limit then
  local untl = now + rest
  local pause = tonumber(redis.call('HGET', KEYS[1], 'pause')) or 0
  if untl > pause then
    redis.call('HSET', KEYS[1], 'pause', string.format('%.6f', untl), 'pause_by', ARGV[7])
    redis.call('PEXPIRE', KEYS[1], math.ceil(rest * 1000) + 60000)
  end
  return {'1', tostring(ours)}
end
return {'0', tostring(ours)}
"""

# KEYS: state hash, members zset, pace hash, busy zset. ARGV: now, member
# ('': a probe), member_ttl ('': leave), demand ('': not busy; else busy with
# this demand).
# Returns {pause (server time), pause_by, seconds to it, members}. Members
# that left are dropped by the acquire script (with their pace).
_HEARTBEAT = _CLOCK + """
local now = clock(ARGV[1])
if ARGV[2] == '' then
  -- a probe: membership untouched
elseif ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
else
  redis.call('ZADD', KEYS[2], now, ARGV[2])
  if ARGV[4] ~= '' then
    redis.call('ZADD', KEYS[4], now, ARGV[2])
    redis.call('HSET', KEYS[3], 'd|' .. ARGV[2], ARGV[4])
  end
  for k = 2, 4 do
    if redis.call('PTTL', KEYS[k]) < 0 then
      redis.call('PEXPIRE', KEYS[k], math.ceil(tonumber(ARGV[3]) * 2000))
    end
  end
end
local pause = tonumber(redis.call('HGET', KEYS[1], 'pause')) or 0
return {string.format('%.6f', pause), redis.call('HGET', KEYS[1], 'pause_by') or '',
        string.format('%.6f', pause - now), tostring(redis.call('ZCARD', KEYS[2]))}
"""


@attrs.frozen
class Slot:
    """The server's answer to one reservation."""

    wait: float  # seconds from now until the slot
    pause: float  # the shared pause, server time (0: none)
    pause_by: str  # the member that set it
    members: int
    rest: float  # seconds from now until the pause ends (<= 0: none)
    part: float  # this member's part of the budget while others are busy
    again: bool  # ahead of its own pace: nothing reserved, ask again after ``wait``


class BudgetScripts:
    """The Lua scripts on one Redis client, for one budget ``key``; blocking
    calls (run them in a thread). ``now`` (seconds) replaces the server's
    clock, for tests."""

    def __init__(self, client: Any, key: str) -> None:
        self.client = client
        base = "{flows:budget:" + key + "}"
        self.keys = (f"{base}:state", f"{base}:members", f"{base}:usage", f"{base}:pace",
                     f"{base}:busy")
        self._acquire = client.register_script(_ACQUIRE)
        self._pause = client.register_script(_PAUSE)
        self._usage = client.register_script(_USAGE)
        self._heartbeat = client.register_script(_HEARTBEAT)

    def acquire(self, member: str, weight: float, limits: Sequence[RateLimit], *,
                processes: int = 1, member_ttl: float = 3.0, demand: float = 1.0,
                idle_after: float = 1.0, fresh: float = 1.5, now: float | None = None) -> Slot:
        args: list[Any] = [_now(now), member, processes, member_ttl, weight, len(limits),
                           repr(float(demand)), repr(float(idle_after)), repr(float(fresh))]
        for limit in limits:
            args += [_field(limit), repr(float(limit.limit)), repr(float(limit.window))]
        wait, pause, by, members, rest, part, again = self._acquire(keys=self.keys, args=args)
        return Slot(float(wait), float(pause), _text(by), int(members), float(rest), float(part),
                    again in (b"1", "1"))

    def pause(self, member: str, seconds: float, *, now: float | None = None) -> float:
        return float(self._pause(keys=self.keys[:1], args=[_now(now), repr(seconds), member]))

    def usage(self, member: str, used: float, limit: float, seconds: float, first: RateLimit,
              *, now: float | None = None) -> tuple[bool, float]:
        """Whether the API's ``used`` (of ``limit``) made everyone pause, and
        the weight the sharing processes reserved in this window."""
        paused, ours = self._usage(
            keys=(self.keys[0], self.keys[2]),
            args=[_now(now), repr(used), repr(limit), repr(seconds), _field(first),
                  repr(float(first.window)), member])
        return paused in (b"1", "1"), float(ours)

    def heartbeat(self, member: str, member_ttl: float | None, *, busy: float | None = None,
                  now: float | None = None) -> tuple[float, str, float, int]:
        """(pause, paused by, seconds to it, members); ``member`` "": a probe
        that joins nothing; ``member_ttl`` None: leave; ``busy``: the
        member's demand, when it is busy."""
        ttl = "" if member_ttl is None else repr(member_ttl)
        demand = "" if busy is None else repr(float(busy))
        pause, by, rest, members = self._heartbeat(
            keys=(self.keys[0], self.keys[1], self.keys[3], self.keys[4]),
            args=[_now(now), member, ttl, demand])
        return float(pause), _text(by), float(rest), int(members)


def _now(now: float | None) -> str:
    return "" if now is None else repr(float(now))


def _field(limit: RateLimit) -> str:
    """One limit's entry: sources whose limits differ never share a slot sequence."""
    return f"tat:{limit.limit:g}/{limit.window:g}s"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LocalShare:
    """The fallback: ``limits`` (already this process's share), with requests
    evenly spaced and no burst, as the shared script spaces them, so going
    from one to the other never lets two requests through at once."""

    def __init__(self, limits: Sequence[RateLimit]) -> None:
        self.limits = tuple(limits)
        self._next = -math.inf  # trio time of the next free slot
        self._paused_until = -math.inf
        self._sent: deque[tuple[float, float]] = deque()  # (trio time, weight)

    def pause_until(self, deadline: float) -> None:
        self._paused_until = max(self._paused_until, deadline)

    def next_free(self) -> float:
        return max(self._next, self._paused_until)

    async def acquire(self, weight: float = 1.0) -> None:
        interval = max(weight * lim.window / lim.limit for lim in self.limits)
        while True:
            at = max(trio.current_time(), self.next_free())
            self._next = at + interval
            await trio.sleep_until(at)
            if self._paused_until <= trio.current_time():  # else a pause came meanwhile
                break
        self._sent.append((at, weight))

    def used(self, window: float) -> float:
        """Weight sent in the last ``window`` seconds."""
        since = trio.current_time() - window
        while self._sent and self._sent[0][0] <= since - 60.0:
            self._sent.popleft()
        return sum(w for t, w in self._sent if t > since)


_LOCAL_SHARES: weakref.WeakValueDictionary[Any, LocalShare] = weakref.WeakValueDictionary()


def _local_share(key: Any, limits: Sequence[RateLimit]) -> LocalShare:
    """The process's one local share of a budget: its sources on the same
    budget and limits take turns in it, so together they stay within
    ``1 / processes`` while Redis is away. One per trio run (its times
    are that run's clock)."""
    try:
        key = (trio.lowlevel.current_trio_token(), key)
    except RuntimeError:  # built outside trio
        key = (None, key)
    share = _LOCAL_SHARES.get(key)
    if share is None:
        share = _LOCAL_SHARES[key] = LocalShare(limits)
    return share


class SharedRateLimiter:
    """``RateLimiter``'s interface (``acquire``, ``pause_until``,
    ``observe_usage``, ``limits``, ``declared``) over a ``RateBudget``.

    Use it inside ``attached(limiter, metrics)`` (``HttpSource`` does): that
    runs the heartbeat and binds the metrics. ``health()`` says ``degraded``
    while the local fallback runs.
    """

    def __init__(self, budget: RateBudget, limits: Sequence[RateLimit], *, key: str,
                 processes: int = 1, demand: float = 1.0, share: float = 0.98,
                 name: str = "source") -> None:
        self.budget = budget
        self.key = budget.key or key
        self.processes = budget.processes or processes
        self.demand = max(demand, 1e-9)
        """This process's work per cycle (its symbols): busy processes share
        the budget in proportion to it."""
        self.name = name
        self.member = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.declared = tuple(limits)
        self.limits = tuple(RateLimit(lim.limit * share, lim.window) for lim in limits)
        self.fallback = _local_share(
            (budget.url, self.key, self.processes, self.declared),
            [RateLimit(lim.limit * share / self.processes, lim.window) for lim in self.declared])
        self._local_waiters = 0  # requests waiting on the fallback
        self._drained = trio.Event()  # set when the last of them went
        self.degraded: str | None = None
        self._rejoining = False  # back from the fallback: space the first request as it would
        self._weight = 1.0  # of the last request
        self._asked_at = -math.inf  # trio time of the last acquire
        self._contact = -math.inf  # trio time Redis last answered
        self._paused_until = -math.inf  # trio time
        self._counted_pause = 0.0  # the last pause from another process already counted
        self._lock = trio.Lock()
        self._scripts: BudgetScripts | None = None
        self._nursery: trio.Nursery | None = None
        self._metrics: Any = None

    # -- the RateLimiter interface ------------------------------------------------

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def pause_until(self, deadline: float) -> None:
        """Send nothing before ``deadline`` (trio time), and tell the others."""
        self._paused_until = max(self._paused_until, deadline)
        self.fallback.pause_until(deadline)
        if self._nursery is not None and self.degraded is None:
            seconds = deadline - trio.current_time()
            self._nursery.start_soon(self._call, "pause", self.member, seconds)

    def observe_usage(self, used: float, limit: float, window_end: float) -> None:
        """A usage header: compared with what every sharing process sent."""
        if self.degraded is not None or self._nursery is None:
            # on the local share: the others may use all of theirs
            others = limit * (self.processes - 1) / self.processes
            own = self.fallback.used(self.limits[0].window)
            if used >= 0.9 * limit and used > others + own + 0.05 * limit:
                self._paused_until = max(self._paused_until, window_end)
                self.fallback.pause_until(window_end)
            return
        if used < 0.9 * limit:  # the rule pauses no one below this: no round trip
            return
        rest = window_end - trio.current_time()
        self._nursery.start_soon(self._observed, used, limit, rest)

    async def acquire(self, weight: float = 1.0) -> float:
        """Wait until a request of ``weight`` may start; returns seconds waited.

        A process holds one reservation at a time (its other requests queue
        behind it): after a stall (a busy CPU) it sends one late request,
        not a burst of them."""
        start = self._asked_at = trio.current_time()
        self._weight = weight
        while not await self._acquire_once(weight):
            pass
        waited = trio.current_time() - start
        if self._metrics is not None:
            self._metrics.labeled(BUDGET_WAIT).observe(waited)
        return waited

    async def _acquire_once(self, weight: float) -> bool:
        """One try: True once the request may go, False to try again."""
        await trio.sleep_until(self._paused_until)
        if self.degraded is not None or self._scripts is None:
            self._local_waiters += 1
            try:
                await self.fallback.acquire(weight)
            finally:
                self._local_waiters -= 1
                if not self._local_waiters:
                    self._drained.set()
                    self._drained = trio.Event()
            return True
        async with self._lock:
            if self._rejoining:  # back from the fallback: its queue first, then its pace
                while self._local_waiters:
                    await self._drained.wait()
                await trio.sleep_until(self.fallback.next_free())
                self._rejoining = False
            slot = await self._call("acquire", self.member, weight, self.limits,
                                    processes=self.processes, member_ttl=self.budget.member_ttl,
                                    demand=self.demand, idle_after=self._idle_after(weight),
                                    fresh=self._fresh)
            if slot is None:
                return False  # Redis is away: the fallback takes it from here
            self._note_pause(slot.pause, slot.pause_by, slot.rest)
            if slot.again:  # ahead of its own pace: nothing reserved
                await trio.sleep(slot.wait)
                return False
            if slot.wait <= 0:
                return True
            await trio.sleep(slot.wait)
            # a long wait: a pause may have come meanwhile
            return slot.wait < self.budget.recheck_after or not await self._recheck()

    # -- health, life cycle -------------------------------------------------------

    def health(self) -> str | None:
        return self.degraded

    @asynccontextmanager
    async def running(self, metrics: Any = None) -> AsyncIterator[None]:
        """Connect, heartbeat in the background, leave the budget at the end."""
        import redis  # the `redis` extra: pip install 'flows[redis]'
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            # one retry: a pooled connection that died with a restarted Redis reconnects
            self.budget.url, retry=Retry(NoBackoff(), 1), socket_timeout=self.budget.timeout,
            socket_connect_timeout=self.budget.timeout, health_check_interval=0)
        self._scripts = BudgetScripts(client, self.key)
        self._metrics = metrics
        if metrics is not None:
            _export(metrics)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._heartbeats)
                try:
                    yield
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True), trio.move_on_after(self.budget.timeout):
                await trio.to_thread.run_sync(self._leave, client, abandon_on_cancel=True)

    def _leave(self, client: Any) -> None:
        try:
            if self._scripts is not None and self.degraded is None:
                self._scripts.heartbeat(self.member, None)
        except Exception as exc:
            log.debug("source %s: could not leave the rate budget: %s", self.name, redact(exc))
        finally:
            client.close()

    async def _heartbeats(self) -> None:
        while True:
            # back from the fallback, it probes without joining until its
            # local queue is sent (joining hands its part to the others)
            if self._rejoining and not self._local_waiters:
                self._rejoining = trio.current_time() < self.fallback.next_free()
            member = "" if self.degraded is not None or self._rejoining else self.member
            beat = await self._call("heartbeat", member, self.budget.member_ttl,
                                    busy=self._busy())
            if beat is not None:
                pause, by, rest, _ = beat
                self._note_pause(pause, by, rest)
                if self.degraded is not None:
                    log.info("source %s: rate budget %s answers again; shared budget resumed",
                             self.name, redact(self.budget.url))
                    self._set_degraded(None)
            await trio.sleep(self.budget.probe_every)

    # -- helpers --------------------------------------------------------------------

    @property
    def _fresh(self) -> float:
        """Heard from within this, a member is on the shared budget (three
        heartbeats); past it, it may be on its local share."""
        return 3 * self.budget.probe_every

    def _busy(self) -> float | None:
        """This process's demand while it asks for slots, else None."""
        recent = trio.current_time() - self._asked_at < self.budget.idle_after
        return self.demand if recent else None

    def _idle_after(self, weight: float) -> float:
        """Silence that makes a process idle: ``idle_after``, or three of its
        intervals on a ``1 / processes`` part when that is longer."""
        interval = max((weight * lim.window / lim.limit for lim in self.limits), default=0.0)
        return max(self.budget.idle_after, 3 * self.processes * interval)

    async def _call(self, what: str, *args: Any, **kwargs: Any) -> Any:
        """A script call in a thread; None (and the fallback) when Redis fails."""
        assert self._scripts is not None
        fn = getattr(self._scripts, what)
        try:
            with trio.fail_after(self.budget.timeout * 2):
                answer = await trio.to_thread.run_sync(
                    lambda: fn(*args, **kwargs), abandon_on_cancel=True)
            self._contact = trio.current_time()
            return answer
        except Exception as exc:
            if self.degraded is None:
                log.warning("source %s: rate budget %s unreachable (%s: %s); on a local share "
                            "(1/%d of the limit) until it answers", self.name,
                            redact(self.budget.url), type(exc).__name__, redact(exc),
                            self.processes)
                self._set_degraded(
                    f"degraded: source {self.name}: rate budget {redact(self.budget.url)} "
                    f"unreachable, on a local share (1/{self.processes} of the limit)")
            return None

    def _set_degraded(self, why: str | None) -> None:
        """Into the fallback (``why``) or out of it (None). Going in, the local
        share starts once the others hold this process's part for it (it has
        not been heard from for ``_fresh``) and one of its intervals after
        the last shared request; coming out, the next request waits for its
        local slot (and for the requests queued on the fallback). So the
        sum stays under the limit across the change."""
        if why is not None and self.degraded is None:
            interval = max(self._weight * lim.window / lim.limit for lim in self.fallback.limits)
            now = trio.current_time()
            self.fallback.pause_until(max(now + interval, self._contact + self._fresh + 0.1))
        elif why is None and self.degraded is not None:
            self._rejoining = True
        self.degraded = why
        if self._metrics is not None:
            self._metrics.labeled(BUDGET_FALLBACK).set(0 if why is None else 1)

    def _note_pause(self, pause: float, by: str, rest: float) -> None:
        """A shared pause seen on the server: obey it (and count it once when
        another process set it)."""
        if rest <= 0:
            return
        if by and by != self.member and pause > self._counted_pause:
            self._counted_pause = pause
            if self._metrics is not None:
                self._metrics.labeled(BUDGET_PAUSES).inc()
            log.info("source %s: pausing %.2fs (shared rate budget, set by another process)",
                     self.name, rest)
        self._paused_until = max(self._paused_until, trio.current_time() + rest)
        self.fallback.pause_until(self._paused_until)

    async def _recheck(self) -> bool:
        """After a long wait: is there a shared pause now? (True: go round again.)"""
        beat = await self._call("heartbeat", self.member, self.budget.member_ttl,
                                busy=self.demand)
        if beat is None:
            return True
        pause, by, rest, _ = beat
        self._note_pause(pause, by, rest)
        return rest > 0

    async def _observed(self, used: float, limit: float, rest: float) -> None:
        first = self.limits[0]
        answer = await self._call("usage", self.member, used, limit, rest, first)
        if answer is not None and answer[0]:
            self._paused_until = max(self._paused_until, trio.current_time() + rest)


@asynccontextmanager
async def attached(limiter: Any, metrics: Any = None) -> AsyncIterator[None]:
    """``limiter.running(metrics)`` for a shared limiter; for a local one,
    only the budget's series (at 0), so every HTTP source exports them."""
    running = getattr(limiter, "running", None)
    if running is None:
        if metrics is not None:
            _export(metrics)
        yield
        return
    async with running(metrics):
        yield


def _export(metrics: Any) -> None:
    metrics.register(*BUDGET_METRICS)
    metrics.labeled(BUDGET_WAIT)
    metrics.labeled(BUDGET_FALLBACK).set(0)
    metrics.labeled(BUDGET_PAUSES)


def with_budget(limiter: Any, budget: str | RateBudget | None, shard: Any, *, base_url: str,
                name: str, demand: float = 1.0) -> Any:
    """The limiter an HTTP source runs with: ``limiter`` itself without a
    budget, else a ``SharedRateLimiter`` on ``budget`` under the same limits,
    keyed by the API's host and the limits (sources on one host whose limits
    differ have budgets of their own), whose fallback is ``1 / N`` (N of ``shard``),
    sharing in proportion to ``demand`` (the source's symbols)."""
    if budget is None or isinstance(limiter, SharedRateLimiter):
        return limiter
    budget = RateBudget.of(budget)
    host = urlsplit(base_url).netloc or base_url or name
    key = host + "|" + ",".join(f"{lim.limit:g}/{lim.window:g}s" for lim in limiter.declared)
    processes = shard.count if shard is not None else 1
    return SharedRateLimiter(budget, limiter.declared, key=key, processes=processes,
                             demand=demand, name=name)
