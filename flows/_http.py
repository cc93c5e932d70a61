"""The machinery every HTTP polling source shares (one implementation, not six).

A subclass says what to ask and how to read the answer:

- ``plan(symbols) -> list[Request]``: the requests that refresh ``symbols``
  (one per symbol, or a few for an all-symbols or multi-symbol endpoint;
  GETs, or POSTs of a JSON body: ``Request(method="POST", json=...)``);
- ``parse(request, body) -> Parsed``: Ticks plus counts of bad records
  (the base then drops, as ``invalid``, every Tick ``flows.check_tick``
  refuses: a ``ts`` that is not a time from 2000-01-01 to tomorrow, a
  symbol that is empty or longer than 64 characters, a bad price);
- optionally ``on_response(response)`` to read usage headers.

``HttpSource`` does the rest: one ``httpx.AsyncClient`` per source with
pooling and separate connect/read timeouts, a cap on response size, the
rate limiter (the API's documented limits, tightened by 429/418
Retry-After and usage headers), retries by the ``retry`` policy
(``flows.Retry``) for timeouts, connection errors, 5xx and 429 (never other 4xx), a
circuit breaker, the per-source metrics, standby for a primary source
(fallback), and a one-shot mode that polls the symbol set once, shows
progress, and keeps a checkpoint of finished symbols so a crashed sync
resumes where it stopped.

Metrics (labels ``flow``, ``stage``), declared in ``HttpSource.METRICS``:
``flows_source_request_seconds`` (``endpoint``),
``flows_source_responses_total`` (``status_class``),
``flows_source_retries_total``, ``flows_source_rate_limit_wait_seconds``,
``flows_source_circuit_state``, ``flows_source_parked_symbols``, plus the core set.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import msgspec
import trio

from ._actors import RunContext
from ._budget import BUDGET_METRICS, RateBudget, attached, with_budget
from ._channels import Outbox
from ._checkpoint import write_atomic
from ._freshness import stale_after_for
from ._gaps import WallClock
from ._limits import CircuitBreaker, RateLimit, RateLimiter
from ._log import DropLog
from ._metrics import LATENCY_BUCKETS, ComponentMetrics, MetricFamily
from ._progress import Progress
from ._records import AckHook, Batch, check_symbols, screen
from ._redact import add_secret, redact
from ._retry import Retry
from ._schedule import SCHEDULE_METRICS, AdaptiveSchedule, Calendar

__all__ = ["HttpError", "HttpSource", "Parsed", "Request", "parse_optional_float", "parse_price"]

log = logging.getLogger("flows.http")


@attrs.frozen
class Request:
    """One request: ``endpoint`` names it in metrics (a small fixed set).

    A GET by default; ``method="POST"`` with ``json`` (any value msgspec or
    the json module encodes) sends that as the JSON body, for APIs that
    take their arguments in the body (LiveCoinWatch).
    """

    endpoint: str
    path: str
    params: dict[str, str] = attrs.field(factory=dict)
    weight: float = 1.0
    symbols: tuple[str, ...] = ()
    method: str = "GET"
    json: Any = None


@attrs.define
class Parsed:
    """What a response held: good Ticks and bad records counted by reason.

    ``unknown``: asked symbols the answer says the API does not know, for
    APIs that leave an unknown symbol out of their answer instead of
    failing the request (CoinGecko, CoinCap): the source parks them as it
    parks a symbol a request failed for (an answer that holds none of
    several asked symbols is asked again by halves first).

    ``acks``: hooks the batch of these records carries, each called once
    with the batch's outcome when the sinks are done with it (at once with
    ``"skipped"`` when there are no records): a source that remembers what
    it fetched (a resume point) notes it there, once it is stored.
    """

    ticks: list[Any] = attrs.field(factory=list)  # Ticks, Trades, OutcomePrices...
    invalid: dict[str, int] = attrs.field(factory=dict)
    details: list[str] = attrs.field(factory=list)
    unknown: list[str] = attrs.field(factory=list)
    acks: list[AckHook] = attrs.field(factory=list)

    def bad(self, reason: str, detail: str = "") -> None:
        self.invalid[reason] = self.invalid.get(reason, 0) + 1
        if detail:
            self.details.append(detail)


class HttpError(Exception):
    """A response that is not a usable answer.

    ``transient`` says retry; ``retry_after`` (seconds) marks rate limiting;
    ``symbol_error`` says the API is fine but a symbol is not (unknown,
    delisted): it does not count against the circuit breaker.
    """

    def __init__(
        self,
        message: str,
        *,
        transient: bool,
        retry_after: float | None = None,
        symbol_error: bool = False,
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
        self.symbol_error = symbol_error


def _learn_secrets(url: str, headers: dict[str, str]) -> None:
    """Register the secrets of a source's URL and headers with ``redact``:
    a URL's password or key parameters, and every header value that
    carries credentials (``Authorization``, ``Cookie``, a name holding
    key, token, secret, ...)."""
    redact(url, learn=True)
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in ("authorization", "proxy-authorization"):
            redact(f"{name}: {value}", learn=True)
        elif lowered == "cookie" or any(word in lowered for word in _SECRET_HEADER_WORDS):
            add_secret(value)


_SECRET_HEADER_WORDS = ("key", "token", "secret", "pass", "auth", "signature", "credential",
                        "session")


def screened(parsed: Parsed) -> Parsed:
    """``parsed`` without the Ticks ``check_tick`` refuses (bad time, symbol
    or values), those counted as ``invalid`` with their reasons."""
    parsed.ticks, bad = screen(parsed.ticks)
    for why in bad:
        parsed.bad("invalid", why)
    return parsed


def parse_price(value: Any) -> float:
    """A positive finite price from a number or numeric string, else ValueError
    (also for ``"NaN"``, ``"inf"``, zero and negative values)."""
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"price {value!r} is not a positive number")
    return number


def parse_optional_float(value: Any) -> float | None:
    """A float from a number or numeric string; None for None, ``""`` and
    non-finite values; ValueError for a non-numeric string."""
    if value is None or value == "":
        return None
    number = float(value)
    return number if math.isfinite(number) else None


price = parse_price  # the older names
optional_float = parse_optional_float

REQUEST_SECONDS = MetricFamily(
    "flows_source_request_seconds", "histogram",
    "At an HTTP source: time one request took, by endpoint.",
    labels=("endpoint",), buckets=LATENCY_BUCKETS,
)
RESPONSES = MetricFamily(
    "flows_source_responses_total", "counter",
    "At an HTTP source: responses by status class (2xx, 4xx, 429, 5xx, error when there was "
    "no response).",
    labels=("status_class",),
)
RETRIES = MetricFamily("flows_source_retries_total", "counter",
                       "At an HTTP source: requests retried.")
RATE_LIMIT_WAIT = MetricFamily(
    "flows_source_rate_limit_wait_seconds", "histogram",
    "At an HTTP source: time a request waited for the rate limiter.", buckets=LATENCY_BUCKETS,
)
CIRCUIT_STATE = MetricFamily(
    "flows_source_circuit_state", "gauge",
    "At an HTTP source: circuit breaker state (0 closed, 1 half-open, 2 open).",
)
PARKED = MetricFamily(
    "flows_source_parked_symbols", "gauge",
    "At an HTTP source: symbols parked as unknown to the API (delisted, misspelt), probed "
    "again every reprobe_every; /status names them.",
)


def _body_of(request: Request) -> dict[str, Any]:
    """The body options of ``request`` for httpx: its JSON, if it has one."""
    if request.json is None:
        return {}
    return {"content": msgspec.json.encode(request.json),
            "headers": {"content-type": "application/json"}}


def status_class(status: int) -> str:
    return "429" if status in (418, 429) else f"{status // 100}xx"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


class HttpSource:
    """Base class of HTTP polling sources. Subclasses set ``DEFAULT_URL`` and
    ``DEFAULT_LIMITS`` (the API's documented limits) and implement ``plan``
    and ``parse``.

    All parameters are keyword-only.

    Parameters:
        symbols: the symbols to poll, in the exchange's naming.
        every: seconds from the start of one poll cycle to the next.
        base_url: the API's root (default: the real one); point it at a
            testnet, a proxy or the emulator.
        limits: rate limits to respect (default: the documented ones).
        concurrency: requests in flight at once.
        connect_timeout: seconds to connect.
        read_timeout: seconds to wait for the server.
        max_response_bytes: larger bodies are refused (counted, retried).
        retry: the retry policy for transient failures (``flows.Retry``;
            default ``DEFAULT_RETRY``: 4 attempts, 0.2 s doubling up to 5 s).
        circuit: the breaker (default: 5 failures, 30 s open).
        once: poll the symbol set once and end (a one-shot sync).
        resume: with ``once``, a file listing finished symbols (their records
            acked by the sinks), so a crashed sync resumes where it stopped
            (deleted when the sync completes).
        progress: show a progress bar (default: when stderr is a terminal).
        standby_for: another source; poll only while its circuit is open.
        reprobe_every: seconds between probes of a parked (unknown) symbol.
        schedule: ``"fixed"`` (default: every symbol every ``every``
            seconds) or ``"adaptive"`` (each symbol as often as it moves,
            from every ``every`` to every ``max_staleness`` seconds; or a
            ``flows.AdaptiveSchedule`` with its own settings).
        max_staleness: with ``schedule="adaptive"``, the longest a symbol
            goes unpolled (default 60 s).
        calendar: the market's trading hours (``flows.Calendar``; default
            always open): closed, symbols are polled every
            ``max_staleness`` only, once more right after the close.
        headers: sent with every request (API keys: the values of
            ``Authorization``, ``Cookie`` and headers named like key,
            token, secret are masked wherever shown, ``flows.redact``).
        rate_budget: a rate budget shared with other processes through Redis
            (``"redis://127.0.0.1:6379/0"`` or a ``RateBudget``; default: the
            runtime's ``--rate-budget``, else this process's own limiter).
        name: the actor's name and the ``source`` field of its Ticks.
    """

    DEFAULT_URL = ""
    DEFAULT_LIMITS: tuple[RateLimit, ...] = (RateLimit(10, 1.0),)
    METRICS: tuple[MetricFamily, ...] = (
        REQUEST_SECONDS, RESPONSES, RETRIES, RATE_LIMIT_WAIT, CIRCUIT_STATE, PARKED,
        *BUDGET_METRICS, *SCHEDULE_METRICS)
    EXCHANGE_TIMES = False
    """True when a Tick's ``ts`` is when its price was set at the exchange
    (its last trade), so a schedule can measure detection delays."""
    DEFAULT_RETRY = Retry(attempts=4, backoff=0.2, max_backoff=5.0)
    PAUSE_WITHOUT_RETRY_AFTER = False
    """A 429 without ``Retry-After`` pauses for the longest limit window (for
    APIs that count per window and do not say when it ends)."""

    def __init__(
        self,
        *,
        symbols: Sequence[str],
        every: float = 1.0,
        base_url: str | None = None,
        limits: Sequence[RateLimit] | None = None,
        concurrency: int = 8,
        connect_timeout: float = 3.0,
        read_timeout: float = 10.0,
        max_response_bytes: int = 8 << 20,
        retry: Retry | None = None,
        circuit: CircuitBreaker | None = None,
        once: bool = False,
        resume: str | Path | None = None,
        progress: bool | None = None,
        standby_for: HttpSource | None = None,
        headers: dict[str, str] | None = None,
        reprobe_every: float = 600.0,
        rate_budget: str | RateBudget | None = None,
        schedule: str | AdaptiveSchedule = "fixed",
        max_staleness: float | None = None,
        calendar: Calendar | None = None,
        name: str,
    ) -> None:
        symbols = check_symbols(symbols, name)
        if not every > 0 or concurrency < 1:
            raise ValueError(f"{name}: every must be > 0 and concurrency >= 1")
        self.symbols = list(symbols)
        self.every = every
        self.base_url = (base_url or self.DEFAULT_URL).rstrip("/")
        self.limiter = RateLimiter(list(limits or self.DEFAULT_LIMITS))
        self.rate_budget = None if rate_budget is None else RateBudget.of(rate_budget)
        self.concurrency = concurrency
        self.timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self.max_response_bytes = max_response_bytes
        self.retry = self.DEFAULT_RETRY if retry is None else retry
        self.circuit = circuit or CircuitBreaker()
        self.once = once
        self.resume = None if resume is None else Path(resume)
        self.progress = progress
        self.standby_for = standby_for
        self.headers = dict(headers or {})
        _learn_secrets(self.base_url, self.headers)
        self.name = name
        self.cycles = 0
        self._drops = DropLog(f"flows.source.{name}")
        self._fresh = False
        if not reprobe_every > 0:
            raise ValueError(f"{name}: reprobe_every must be > 0")
        self.reprobe_every = reprobe_every
        self.parked: dict[str, float] = {}
        """Symbols the API does not know, with the trio time of their next probe."""
        self._polled_at: dict[str, float] = {}  # symbol -> epoch time of its last good poll
        self._polled_all: float | None = None  # of the last good all-symbols poll
        self._wall: WallClock  # set per run
        self._stale_after = math.inf  # the runtime's stale_after for this source, set per run
        self._started = time.time()
        self._opened_wall: float | None = None  # when the circuit opened, epoch seconds
        self.metrics: ComponentMetrics | None = None
        """The component's metrics once running (for hooks that count their own families)."""
        self.schedule = _schedule_for(name, schedule, max_staleness, calendar)
        """The per-symbol schedule (None: fixed poll cycles)."""
        if self.schedule is not None:
            self.schedule.claim(self)
            self.stale_after = max(60.0, 1.5 * self.schedule.max_staleness)

    # -- subclass hooks ----------------------------------------------------

    def plan(self, symbols: list[str]) -> list[Request]:
        raise NotImplementedError

    def parse(self, request: Request, body: bytes) -> Parsed:
        raise NotImplementedError

    def on_response(self, response: httpx.Response) -> None:
        """Read usage headers (e.g. Binance's used weight); default: nothing."""

    def check(self, response: httpx.Response, body: bytes) -> None:
        """Raise HttpError for a response that is not an answer (default:
        by status: 429/418 and 5xx transient, other 4xx permanent)."""
        status = response.status_code
        if status < 400:
            return
        text = body[:200].decode("utf-8", "replace")
        if status in (418, 429):
            retry_after = _retry_after(response)
            if retry_after is None and self.PAUSE_WITHOUT_RETRY_AFTER and self.limiter.limits:
                window = max(limit.window for limit in self.limiter.limits)
                raise HttpError(f"HTTP {status} (rate limited, pausing {window:g} s): {text}",
                                transient=True, retry_after=window)
            raise HttpError(f"HTTP {status} (rate limited): {text}", transient=True,
                            retry_after=retry_after)
        raise HttpError(f"HTTP {status}: {text}", transient=status >= 500)

    # -- life cycle ----------------------------------------------------------

    def setup(self, context: RunContext) -> None:
        self._fresh = context.fresh
        if context.shard is not None:
            self.symbols = context.shard.select(self.symbols)
        # at least 1: a shard of a source asking for everything ("*": every
        # page, file or market, split as it goes) owns no symbol yet works as
        # much as the others; ~0 would starve it while they keep the budget busy
        self.limiter = with_budget(self.limiter, self.rate_budget or context.rate_budget,
                                   context.shard, base_url=self.base_url, name=self.name,
                                   demand=max(len(self.symbols), 1))

    def health(self) -> str | None:
        """None when healthy, else why not (shown on /readyz)."""
        if self.circuit.state == "open":
            return f"source {self.name}: circuit open"
        if self.circuit.state == "half_open":
            return f"source {self.name}: circuit half-open (probing)"
        if self.standby_for is not None and self.standby_for.circuit.state != "closed":
            return f"degraded: {self.name} stands in for {self.standby_for.name}"
        return getattr(self.limiter, "degraded", None)  # a shared rate budget out of reach

    async def run(self, outbox: Outbox) -> None:
        m = outbox.metrics
        self._wall = WallClock()
        self._started = self._wall.now()
        self._stale_after = stale_after_for(self)
        self.metrics = m  # for subclasses' hooks: their own declared families
        m.register(*self.METRICS)
        m.labeled(RETRIES)  # export the series from the start
        m.labeled(PARKED).set(len(self.parked))
        for family in SCHEDULE_METRICS:
            m.labeled(family)
        state = m.labeled(CIRCUIT_STATE)
        state.set(CircuitBreaker.STATES[self.circuit.state])
        async with httpx.AsyncClient(
            base_url=self.base_url,
            timeout=self.timeout,
            headers={"user-agent": "flows/0.1", **self.headers},
            limits=httpx.Limits(max_connections=self.concurrency,
                                max_keepalive_connections=self.concurrency),
        ) as client, attached(self.limiter, m):
            if self.once:
                await self._sync_once(client, outbox, state)
                return
            if self.schedule is not None:
                await self.schedule.serve(self, client, outbox, state)
                return
            deadline = trio.current_time()
            while True:
                if await self._standing_by():
                    deadline = trio.current_time()
                    continue
                await self._cycle(client, outbox, self.symbols, state)
                deadline = max(deadline + self.every, trio.current_time())
                await trio.sleep_until(deadline)

    async def _standing_by(self) -> bool:
        """While the primary is healthy, a standby source waits for it to fail."""
        primary = self.standby_for
        if primary is None or primary.circuit.state != "closed":
            return False
        await primary.circuit.wait_changed()
        return True

    async def _cycle(
        self,
        client: httpx.AsyncClient,
        outbox: Outbox,
        symbols: list[str],
        state: Any,
        on_done: Any = None,
    ) -> None:
        """Refresh ``symbols`` once: every planned request, ``concurrency`` at a time."""
        m = outbox.metrics
        started = time.perf_counter()
        requests = self._plan_with_probes(symbols)
        send_channel, receive_channel = trio.open_memory_channel[Request](len(requests) or 1)
        for request in requests:
            send_channel.send_nowait(request)
        send_channel.close()
        async with trio.open_nursery() as nursery:
            for _ in range(min(self.concurrency, len(requests))):
                nursery.start_soon(self._worker, client, receive_channel.clone(), outbox, state,
                                   on_done)
        receive_channel.close()
        m.observe_poll_cycle(time.perf_counter() - started)
        self.cycles += 1

    def _plan_with_probes(self, symbols: list[str]) -> list[Request]:
        """The requests for ``symbols`` less the parked ones, plus one request
        for each parked symbol due for a probe."""
        parked = self.parked
        if not parked:
            return self.plan(symbols)
        now = trio.current_time()
        due = [s for s in symbols if s in parked and parked[s] <= now]
        active = [s for s in symbols if s not in parked]
        return (self.plan(active) if active else []) + [r for s in due for r in self.plan([s])]

    async def _worker(self, client, requests, outbox, state, on_done) -> None:
        async with requests:
            async for request in requests:
                await self._poll(client, request, outbox, state, on_done)

    async def _poll(self, client, request: Request, outbox: Outbox, state, on_done) -> None:
        """Fetch ``request`` and send its Ticks; an unknown symbol among
        several is isolated by splitting the request, then parked."""
        parsed = await self._fetch(client, request, outbox, state)
        if isinstance(parsed, HttpError):
            if not parsed.symbol_error:
                self._report_gap(outbox, request.symbols, "poll_failed")
            elif len(request.symbols) > 1:
                await self._poll_halves(client, request, outbox, state, on_done)
            else:
                self._park(request.symbols, parsed, outbox)
            return
        ticks, answered = parsed.ticks, request.symbols
        if parsed.unknown:
            if len(request.symbols) > 1 and set(parsed.unknown) >= set(request.symbols):
                for hook in parsed.acks:  # this answer is dropped: asked again by halves
                    hook("failed")
                await self._poll_halves(client, request, outbox, state, on_done)  # none known?
                return
            self._park(parsed.unknown, HttpError("left out of the answer", transient=False,
                                                 symbol_error=True), outbox)
            answered = tuple(s for s in request.symbols if s not in set(parsed.unknown))
        back = [s for s in answered if s in self.parked]
        if back:  # the time they were parked is a gap
            self._report_gap(outbox, back, "unknown_symbol")
        late = self._stale([s for s in answered if s not in self.parked])
        if late:  # silent past stale_after (retries, waits): the whole silence is a gap
            self._report_gap(outbox, late, "stale")
        if answered:
            self._polled(answered)
        if self.schedule is not None:
            self.schedule.answered(answered, ticks, outbox.metrics, self._wall.now())
        for symbol in back:
            del self.parked[symbol]
            log.info("source %s: %s answers again; polled as usual", self.name, symbol)
        if back:
            outbox.metrics.labeled(PARKED).set(len(self.parked))
        if on_done is not None:
            on_done.track(parsed, request.symbols)
        if ticks:
            await outbox.send(Batch(ticks, acks=parsed.acks, source=self.name))
        else:
            for hook in parsed.acks:
                hook("skipped")
        if on_done is not None:
            await on_done.sent(request)

    async def _poll_halves(self, client, request: Request, outbox: Outbox, state, on_done) -> None:
        """Poll ``request``'s symbols again in two halves (to isolate an unknown one)."""
        half = len(request.symbols) // 2
        for part in (request.symbols[:half], request.symbols[half:]):
            for sub in self.plan(list(part)):
                await self._poll(client, sub, outbox, state, on_done)

    def _park(self, symbols: Sequence[str], exc: HttpError, outbox: Outbox) -> None:
        """Stop polling ``symbols`` (unknown to the API); probe them again later.
        A gap (``unknown_symbol``) covers them from their last good poll."""
        self._report_gap(outbox, symbols, "unknown_symbol")
        outbox.metrics.discarded("unknown_symbol", max(len(symbols), 1))
        for symbol in symbols:
            if symbol not in self.parked:
                log.warning("source %s: %s is unknown to the API (%s); parked, probed again "
                            "every %gs", self.name, symbol, exc, self.reprobe_every,
                            extra={"stage": self.name, "reason": "unknown_symbol"})
            self.parked[symbol] = trio.current_time() + self.reprobe_every
        outbox.metrics.labeled(PARKED).set(len(self.parked))

    def _stale(self, symbols: Sequence[str]) -> list[str]:
        """Those of ``symbols`` whose last good poll is older than ``stale_after``."""
        cutoff = self._wall.now() - self._stale_after
        polled = self._polled_at
        return [s for s in symbols if polled.get(s, self._started) < cutoff]

    def _polled(self, symbols: Sequence[str]) -> None:
        now = self._wall.now()
        if symbols:
            self._polled_at.update(dict.fromkeys(symbols, now))
        else:
            self._polled_all = now

    def _report_gap(self, outbox: Outbox, symbols: Sequence[str], reason: str,
                    ahead: float = 0.0) -> None:
        """A gap from the last good poll of ``symbols`` (all: empty) to now
        (plus ``ahead`` seconds: a pause that starts now)."""
        now = self._wall.now() + ahead
        if symbols:
            since = min((self._polled_at.get(s, self._started) for s in symbols), default=now)
        else:
            since = self._polled_all or self._started
        outbox.gap(list(symbols) or None, since, now, reason)

    async def _fetch(
        self, client: httpx.AsyncClient, request: Request, outbox: Outbox, state: Any
    ) -> Parsed | HttpError:
        """One request with retries; what it held, or the error it failed with for good."""
        m = outbox.metrics
        delays = self.retry.delays()
        circuit = self.circuit
        while True:
            if not circuit.allow():
                if circuit.state == "open":
                    await trio.sleep_until(circuit.reopens_at())
                else:  # half-open, another request is the probe: wait for its outcome
                    await circuit.wait_changed()
                continue
            probe = circuit.state == "half_open"
            state.set(CircuitBreaker.STATES[circuit.state])
            try:
                waited = await self.limiter.acquire(request.weight)
                m.labeled(RATE_LIMIT_WAIT).observe(waited)
                parsed = await self._get(client, request, m)
            except HttpError as exc:
                was = circuit.state
                if exc.symbol_error:
                    circuit.success()  # the API answered: only the symbol is bad
                elif exc.retry_after is not None:
                    circuit.answered()  # rate limited: the limiter's business, not the breaker's
                else:
                    circuit.failure()
                self._circuit_moved(outbox, was)
                state.set(CircuitBreaker.STATES[circuit.state])
                m.error("http" if exc.transient else "http_permanent")
                if exc.retry_after is not None:
                    self.limiter.pause_until(trio.current_time() + exc.retry_after)
                    self._report_gap(outbox, request.symbols, "rate_limited", exc.retry_after)
                if exc.symbol_error:
                    return exc  # not a failure of the API: the caller isolates the symbol
                delay = next(delays, None) if exc.transient else None
                if delay is None:
                    self._drops.drop("request_failed", f"{request.endpoint} {request.path}: {exc}")
                    m.discarded("request_failed", max(len(request.symbols), 1))
                    return exc
                m.labeled(RETRIES).inc()
                await trio.sleep(delay)
                continue
            finally:
                if probe:
                    circuit.release()  # a probe cancelled mid-request lets the next one through
            was = circuit.state
            circuit.success()
            self._circuit_moved(outbox, was)
            state.set(CircuitBreaker.STATES[circuit.state])
            with m.timed_batch():
                for reason, n in parsed.invalid.items():
                    m.discarded(reason, n)
                for detail in parsed.details[:1]:
                    self._drops.drop("invalid", detail)
            return parsed

    def _circuit_moved(self, outbox: Outbox, was: str) -> None:
        """Note when the circuit opened; when it closes again, that span is a gap."""
        now_state = self.circuit.state
        if now_state == "open" and was == "closed":
            self._opened_wall = self._wall.now()
        elif now_state == "closed" and was != "closed" and self._opened_wall is not None:
            outbox.gap(None, self._opened_wall, self._wall.now(), "circuit_open")
            self._opened_wall = None

    async def _get(self, client: httpx.AsyncClient, request: Request, m: ComponentMetrics) -> Parsed:
        t0 = time.perf_counter()
        try:
            async with client.stream(request.method, request.path, params=request.params,
                                     **_body_of(request)) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > self.max_response_bytes:
                        raise HttpError(
                            f"response larger than {self.max_response_bytes} bytes", transient=True
                        )
        except httpx.TimeoutException as exc:
            m.labeled(RESPONSES, "error").inc()
            raise HttpError(f"timeout ({type(exc).__name__})", transient=True) from None
        except httpx.RequestError as exc:  # transport, decoding, redirects
            m.labeled(RESPONSES, "error").inc()
            raise HttpError(f"{type(exc).__name__}: {exc}", transient=True) from None
        finally:
            m.labeled(REQUEST_SECONDS, request.endpoint).observe(
                time.perf_counter() - t0
            )
        m.labeled(RESPONSES, status_class(response.status_code)).inc()
        self.on_response(response)
        self.check(response, bytes(body))
        try:
            parsed = self.parse(request, bytes(body))
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, KeyError, TypeError) as exc:
            raise HttpError(f"malformed body: {exc}", transient=True) from None
        return screened(parsed)

    # -- one-shot sync -------------------------------------------------------

    async def _sync_once(self, client: httpx.AsyncClient, outbox: Outbox, state: Any) -> None:
        done: set[str] = set()
        if self.resume is not None and not self._fresh:
            done = self._load_done()
        todo = [s for s in self.symbols if s not in done]
        total, finished = len(self.symbols), len(self.symbols) - len(todo)
        log.info("source %s: one-shot sync of %d symbols (%d already done)", self.name, total, finished)
        report = Progress(f"source {self.name}", total=total, done=finished, unit="symbols",
                          bar=self.progress, logger=log)
        run = _OneShot(self, done, report)
        try:
            await self._cycle(client, outbox, todo, state, run)
        finally:
            report.close()
            run.finished = True
            if self.resume is not None:  # a stopped sync still saves; here, so that no
                self._finish_resume(sorted(done))  # later ack's write can land before it

    def _finish_resume(self, done: list[str]) -> None:
        """The resume file at the end: gone once every symbol is done, else
        what is (blocking: call it in a thread, or from the last late ack)."""
        assert self.resume is not None
        try:
            if set(done) >= set(self.symbols):
                self.resume.unlink(missing_ok=True)
            else:
                self._save_done(done)
        except OSError as exc:
            log.warning("source %s: could not write the resume file %s: %s", self.name,
                        self.resume, exc)

    def _load_done(self) -> set[str]:
        assert self.resume is not None
        try:
            return set(msgspec.json.decode(self.resume.read_bytes(), type=list[str]))
        except FileNotFoundError:
            return set()
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("source %s: resume file %s unusable (%s); starting over",
                        self.name, self.resume, exc)
            return set()

    def _save_done(self, done: list[str]) -> None:
        """Write the finished symbols (blocking: call it in a thread)."""
        assert self.resume is not None
        write_atomic(self.resume, msgspec.json.encode(done))


class _OneShot:
    """A one-shot sync's progress and resume point: a symbol is done once
    the sinks acked its records, so a sync killed before they were stored
    fetches it again. Acks after the source ended rewrite the file (the
    last one leaves it final)."""

    def __init__(self, source: HttpSource, done: set[str], report: Progress) -> None:
        self.source, self.done, self.report = source, done, report
        self.unacked = 0  # answers whose records no sink has acked yet
        self.finished = False  # the source has ended
        self._saved_at = trio.current_time()

    def track(self, parsed: Parsed, symbols: tuple[str, ...]) -> None:
        self.unacked += 1
        parsed.acks.append(functools.partial(self._acked, symbols))

    def _acked(self, symbols: tuple[str, ...], outcome: str) -> None:
        self.unacked -= 1
        if outcome != "failed":
            self.done.update(symbols)
        if self.finished and not self.unacked and self.source.resume is not None:
            self.source._finish_resume(sorted(self.done))

    async def sent(self, request: Request) -> None:
        """``request``'s records are on their way: progress, and now and
        then a checkpoint of what is done."""
        self.report.advance(len(request.symbols))
        source = self.source
        if source.resume is not None and trio.current_time() - self._saved_at >= 1.0:
            self._saved_at = trio.current_time()
            await trio.to_thread.run_sync(source._save_done, sorted(self.done))


def _schedule_for(name: str, schedule: str | AdaptiveSchedule, max_staleness: float | None,
                  calendar: Calendar | None) -> AdaptiveSchedule | None:
    """The schedule object for ``HttpSource(schedule=...)`` (None: fixed cycles)."""
    if isinstance(schedule, AdaptiveSchedule):
        if max_staleness is not None or calendar is not None:
            raise ValueError(f"{name}: give max_staleness and calendar to the AdaptiveSchedule")
        return schedule
    if schedule not in ("fixed", "adaptive"):
        raise ValueError(f"{name}: schedule must be 'fixed', 'adaptive' or an AdaptiveSchedule, "
                         f"not {schedule!r}")
    if schedule == "fixed" and calendar is None:
        if max_staleness is not None:
            raise ValueError(f"{name}: max_staleness needs schedule='adaptive'")
        return None
    return AdaptiveSchedule(max_staleness=60.0 if max_staleness is None else max_staleness,
                            calendar=calendar, adapt=schedule == "adaptive")
