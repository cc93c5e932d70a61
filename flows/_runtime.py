"""The runtime: wires a Flow's channels, supervises its actors, drains on stop.

Shutdown order: stopping (a signal, ``--duration``, ``Runtime.stop()``)
cancels the sources only. Their channel ends close, every downstream actor
drains its inbox, flushes and returns, and the flow ends cleanly. If the
drain takes longer than ``drain_timeout`` seconds, or a second stop
arrives, the remaining actors are cancelled (a forced stop).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypedDict

import attrs
import trio
from prometheus_client import REGISTRY, CollectorRegistry

from ._actors import RunContext
from ._channels import ConflatingPort, EdgePort, Inbox, InlinePort, Outbox, open_edge
from ._flow import Flow, FlowError
from ._freshness import Freshness, stale_after_for
from ._gaps import GapLog
from ._metrics import ComponentMetrics, metrics_for
from ._redact import redact
from ._schedule import link_change_feeds
from ._shard import Shard
from ._status import flow_status

__all__ = ["FlowFailed", "RunResult", "Runtime", "run_flow"]

log = logging.getLogger("flows.runtime")

INLINE = True
"""Run inlinable stages in their producer's task (``InlinePort``); tests
turn it off to compare both ways."""


class FlowFailed(Exception):
    """An actor exhausted its restart budget; the flow stopped."""


@attrs.frozen
class RunResult:
    """How a flow run ended.

    ``clean`` is true when every actor drained and returned by itself.
    ``reason`` says what started the stop (``exhausted`` when the sources
    ran out, ``signal SIGTERM``, ``duration``, ``stop``).
    """

    clean: bool
    reason: str
    seconds: float


@attrs.frozen
class _Link:
    """One edge of the running graph, for /status: its producer's outbox
    slot and its consumer's inbox."""

    producer: str
    consumer: str
    branch: str
    outbox: Outbox
    index: int
    inbox: Inbox | InlinePort

    def figures(self) -> dict[str, Any]:
        used, capacity = self.inbox.buffer()
        figures = {
            "from": self.producer,
            "to": self.consumer,
            "branch": self.branch or None,
            "buffer": {"used": used, "capacity": capacity},
            "send_wait_seconds": round(self.outbox.waits[self.index], 6),
        }
        if isinstance(self.inbox, InlinePort):
            figures["inline"] = True
        return figures


@attrs.define
class _ActorSlot:
    actor: Any
    kind: str
    metrics: ComponentMetrics
    state: str = "starting"
    restarts: int = 0
    last_error: str | None = None
    freshness: Freshness | None = None
    crashes: deque[float] = attrs.Factory(deque)
    """When it raised, within the supervision window."""
    backoff: float | None = None
    """The wait before its next restart (None: the policy's first)."""


class _EndpointLimits(TypedDict):
    cache: float
    rate: float | None


class Runtime:
    """Runs one Flow. ``await Runtime(flow).run()``; use ``nursery.start`` to
    wait until it is running (the metrics server, if any, is listening).

    Parameters:
        flow: the Flow to run.
        registry: where metrics go (default: prometheus_client's global
            registry, with the process collectors).
        metrics_addr: ``host:port`` for /metrics, /healthz, /readyz and
            /status; port 0 picks a free port; ``None`` or ``"0"`` disables.
        endpoint_cache: the longest an answer of /metrics, /status or
            /readyz is reused, in seconds (a scrape storm computes each at
            most once per interval; /readyz also changes with the flow's state).
        endpoint_rate: requests per second each endpoint answers on average
            (20 back to back); more wait their turn. ``None``: no limit.
        drain_timeout: seconds the drain may take before a forced stop.
        duration: stop by itself after this many seconds.
        handle_signals: drain on SIGINT/SIGTERM (main thread only).
        fresh: ask actors to ignore saved state (checkpoints, offsets).
        shard: poll only this shard's symbols (``Shard(k, N)``).
        rate_budget: a rate budget HTTP sources share with other processes
            through Redis (a ``RateBudget`` or its ``redis://`` URL).
    """

    def __init__(
        self,
        flow: Flow,
        *,
        registry: CollectorRegistry | None = None,
        metrics_addr: str | None = "127.0.0.1:9099",
        endpoint_cache: float = 0.5,
        endpoint_rate: float | None = 20.0,
        drain_timeout: float = 30.0,
        duration: float | None = None,
        handle_signals: bool = False,
        fresh: bool = False,
        shard: Shard | None = None,
        rate_budget: Any = None,
    ) -> None:
        if not isinstance(flow, Flow):
            raise FlowError(f"expected a Flow, got {type(flow).__name__}")
        flow.validate()
        self.flow = flow
        self.registry = REGISTRY if registry is None else registry
        self.metrics = metrics_for(self.registry)
        self.metrics_addr = None if metrics_addr in (None, "", "0") else metrics_addr
        if self.metrics_addr is not None:
            from ._server import check_limits, parse_addr

            parse_addr(self.metrics_addr)  # a bad address fails here, not mid-run
            check_limits(endpoint_cache, endpoint_rate)
        self.endpoint_limits = _EndpointLimits(cache=endpoint_cache, rate=endpoint_rate)
        self.metrics_url: str | None = None
        self.drain_timeout = drain_timeout
        self.duration = duration
        self.handle_signals = handle_signals
        self.fresh = fresh
        self.shard = shard
        self.rate_budget = rate_budget
        self.state = "starting"
        self.stop_reason: str | None = None
        self.started_at = time.monotonic()
        self.slots = [
            _ActorSlot(a, flow.kind(a), self.metrics.component(flow.name, a.name, flow.kind(a)))
            for a in flow.actors
        ]
        for slot in self.slots:
            slot.metrics.slow = flow.slow
        self._sources_scope = trio.CancelScope()
        self._actors_scope: trio.CancelScope | None = None
        self._outer: trio.Nursery | None = None
        self._forced = False
        self._guards: set[trio.CancelScope] = set()
        self._failure: str | None = None
        self.links: list[_Link] = []
        self.gaps = GapLog(flow.name)

    # -- control ---------------------------------------------------------

    def stop(self, reason: str = "stop") -> None:
        """Begin a drain; a second call while draining forces the stop."""
        if self.stop_reason is not None:
            if self.state == "draining":
                log.warning("flow %s: second stop (%s): cancelling now", self.flow.name, reason,
                            extra=self._extra())
                self._force()
            return
        self.stop_reason = reason
        self.state = "draining"
        log.info("flow %s: stopping (%s): draining", self.flow.name, reason, extra=self._extra())
        self._sources_scope.cancel()
        if self._outer is not None and math.isfinite(self.drain_timeout):
            self._outer.start_soon(self._drain_deadline)

    def _extra(self, stage: str | None = None) -> dict[str, str]:
        """Structured fields for JSON logs."""
        return {"flow": self.flow.name} if stage is None else {"flow": self.flow.name, "stage": stage}

    def _force(self) -> None:
        self._forced = True
        if self._actors_scope is not None:
            self._actors_scope.cancel()
        for scope in self._guards:
            scope.cancel()

    @contextmanager
    def _drain_guard(self) -> Iterator[trio.CancelScope]:
        """A scope shielding a send of an inlined stage from the drain that
        cancels its producer (a source); cancelled at once, so the send
        is not made again, when the flow is not draining (another cancel:
        the producer's own timeout) or the stop is forced."""
        with trio.CancelScope(shield=True) as scope:
            if self._forced or self.state != "draining":
                scope.cancel()
            self._guards.add(scope)
            try:
                yield scope
            finally:
                self._guards.discard(scope)

    async def _drain_deadline(self) -> None:
        await trio.sleep(self.drain_timeout)
        log.error(
            "flow %s: drain did not finish within %.1fs: cancelling", self.flow.name, self.drain_timeout
        )
        self._force()

    async def _stop_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self.stop("duration")

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                self.stop(f"signal {signal.Signals(signum).name}")

    # -- status ----------------------------------------------------------

    def ready(self) -> tuple[bool, list[str]]:
        """(ready, reasons): ready when every actor runs (or, for a finite
        source, has finished) and reports healthy (an actor may define
        ``health() -> str | None``, e.g. an open circuit)."""
        reasons = [
            f"{s.kind} {s.actor.name} is {s.state}"
            for s in self.slots
            if s.state != "running" and not (s.kind == "source" and s.state == "finished")
        ]
        for slot in self.slots:
            health = getattr(slot.actor, "health", None)
            problem = health() if callable(health) else None
            if problem:
                reasons.append(problem)
            if slot.freshness is not None and slot.state == "running":
                stale = slot.freshness.problem(slot.actor.name)
                if stale:
                    reasons.append(stale)
        if self.state != "running":
            reasons.insert(0, f"flow is {self.state}")
        return not reasons, reasons

    def totals(self) -> str:
        """One line of per-actor record counts: ``name: in=N out=N dropped=N``
        (plus ``written=N`` at storing sinks, and ``lost=N`` for the records
        a forced stop took, which ``dropped`` includes)."""
        parts = []
        for a in self.status()["actors"]:
            dropped = sum(a["discarded"].values())
            part = f"{a['name']}: in={a['received']} out={a['sent']} dropped={dropped}"
            if "written" in a:
                part += f" written={a['written']}"
            if a["discarded"].get("forced_stop"):
                part += f" lost={a['discarded']['forced_stop']}"
            parts.append(part)
        return "; ".join(parts)

    def status(self) -> dict[str, Any]:
        """The flow graph with per-actor figures, as served on /status."""
        return flow_status(self)

    # -- running ---------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> RunResult:
        """Run until the sources are exhausted or a stop drains the flow.

        Raises FlowFailed when an actor exhausts its restart budget.
        """
        self.started_at = time.monotonic()
        if self.metrics_addr is not None:
            from ._server import check_addr, serve_endpoints

            await check_addr(self.metrics_addr)
        async with trio.open_nursery() as outer:
            self._outer = outer
            if self.metrics_addr is not None:
                self.metrics_url = await outer.start(
                    partial(serve_endpoints, self, self.metrics_addr, **self.endpoint_limits)
                )
            if self.handle_signals:
                outer.start_soon(self._watch_signals)
            if self.duration is not None:
                outer.start_soon(self._stop_after, self.duration)
            try:
                async with trio.open_nursery() as actors:
                    self._actors_scope = actors.cancel_scope
                    self._start_actors(actors)
                    for slot in self.slots:
                        slot.state = "running"  # scheduled; ready() holds from here
                    self.state = "running"
                    log.info(
                        "flow %s: running %s; endpoints on %s",
                        self.flow.name, self.flow, self.metrics_url or "(disabled)",
                        extra=self._extra(),
                    )
                    task_status.started(self)
            finally:
                self.state = "stopped"
                outer.cancel_scope.cancel()
        seconds = time.monotonic() - self.started_at
        if self._failure is not None:
            log.info("flow %s: failed after %.1fs; %s", self.flow.name, seconds, self.totals(),
                     extra=self._extra())
            raise FlowFailed(self._failure)
        if self.stop_reason is None:
            self.stop_reason = "exhausted"
        clean = not self._forced
        if log.isEnabledFor(logging.INFO):
            log.info(
                "flow %s: %s after %.1fs (%s); %s",
                self.flow.name,
                "drained" if clean else "stopped by force",
                seconds,
                self.stop_reason,
                self.totals(),
                extra=self._extra(),
            )
        return RunResult(clean=clean, reason=self.stop_reason, seconds=seconds)

    def _start_actors(self, nursery: trio.Nursery) -> None:
        flow = self.flow
        context = RunContext(flow=flow.name, fresh=self.fresh, shard=self.shard,
                             rate_budget=self.rate_budget)
        for actor in flow.actors:
            setup = getattr(actor, "setup", None)
            if callable(setup):
                setup(context)
        link_change_feeds(flow)
        ports: dict[str, EdgePort | InlinePort] = {}
        inboxes: dict[str, Inbox] = {}
        inline: dict[str, InlinePort] = {}
        for slot in self.slots:
            if slot.kind != "source":
                name = slot.actor.name
                if self._inlinable(slot):
                    ports[name] = inline[name] = self._inline_port(slot)
                    continue
                ports[name], inboxes[name] = open_edge(flow.edge(name), slot.metrics)
                port = ports[name]
                if isinstance(port, ConflatingPort):
                    nursery.start_soon(port.pump)
        outboxes: dict[str, Outbox] = {}
        self.links = []
        for slot in self.slots:
            if slot.kind == "sink":
                continue
            name = slot.actor.name
            consumers = flow.consumers(name)
            if slot.kind == "source" and slot.actor is not flow.gap_source:
                slot.freshness = slot.metrics.freshness = Freshness(stale_after_for(slot.actor))
            outboxes[name] = outbox = Outbox(
                [ports[c] for c, _ in consumers], slot.metrics,
                observe_lag=slot.kind == "source", freshness=slot.freshness,
                chains=[chain for _, chain in consumers],
                unrouted=flow.unconsumed(name),
            )
            outbox.gaps = self.gaps
            self.links += [
                _Link(name, c, " / ".join(b.label for b in chain), outbox, i, inboxes.get(c) or inline[c])
                for i, (c, chain) in enumerate(consumers)
            ]
        for name, port in inline.items():
            port.outbox = outboxes[name]
            port.outbox.guard = self._drain_guard
        for slot in self.slots:
            name = slot.actor.name
            if name in inline:
                slot.metrics.up.set(1)
            elif slot.kind == "stage":
                nursery.start_soon(
                    self._supervise, slot,
                    self._stage_call(slot, inboxes[name], outboxes[name]),
                    self._closer(inboxes[name], outboxes[name]),
                )
            elif slot.kind == "sink":
                nursery.start_soon(
                    self._supervise, slot, lambda s=slot, i=inboxes[name]: s.actor.run(i),
                    self._closer(inboxes[name], None),
                )
        nursery.start_soon(self._run_sources, [outboxes[s.name] for s in flow.sources])

    def _inlinable(self, slot: _ActorSlot) -> bool:
        """A stage that offers ``process`` and allows inlining, fed by a
        single producer whose only consumer it is, over a default edge (an
        edge given its own capacity or policy keeps its channel)."""
        actor, flow = slot.actor, self.flow
        if not (INLINE and slot.kind == "stage" and callable(getattr(actor, "process", None))
                and getattr(actor, "inline", False)):
            return False
        taps = flow.inputs(actor.name)
        if len(taps) != 1 or taps[0].chain or flow.edge(actor.name) is not flow.default_edge:
            return False
        producer = taps[0].producer
        return flow.consumers(producer) == [(actor.name, ())] and not flow.unconsumed(producer)

    def _inline_port(self, slot: _ActorSlot) -> InlinePort:
        """The port that runs ``slot``'s stage in its producer's task."""

        async def crashed(exc: BaseException) -> None:
            if isinstance(exc, Exception) and await self._restart_after(slot, exc):
                slot.state = "running"
                slot.metrics.up.set(1)

        def closed() -> None:
            if slot.state != "failed":
                slot.state = "finished"
            slot.metrics.up.set(0)
            if port.outbox is not None:
                port.outbox.close()

        port = InlinePort(slot.actor, slot.metrics, self.flow.edge(slot.actor.name).capacity, crashed)
        port.closed = closed
        producer = self.flow.inputs(slot.actor.name)[0].producer
        port.producer = next(s.metrics for s in self.slots if s.actor.name == producer)
        return port

    @staticmethod
    def _stage_call(slot: _ActorSlot, inbox: Inbox, outbox: Outbox) -> Callable[[], Awaitable[Any]]:
        return lambda: slot.actor.run(inbox, outbox)

    def _closer(self, inbox: Inbox | None, outbox: Outbox | None) -> Callable[[], None]:
        def close() -> None:
            if inbox is not None:
                inbox.done()
                if self._forced:  # what a forced stop leaves queued is lost: count it
                    inbox.close("forced_stop", "failed")
                else:
                    inbox.close()  # a consumer that quit early must not block its producers
            if outbox is not None:
                outbox.close()

        return close

    async def _run_sources(self, outboxes: list[Outbox]) -> None:
        gap_source = self.flow.gap_source
        self.gaps.stream = gap_source
        feeds = [(s, o) for s, o in zip(self.flow.sources, outboxes) if s is not gap_source]
        with self._sources_scope:
            async with trio.open_nursery() as outer:
                if gap_source is not None:
                    self._start_source(outer, gap_source, outboxes[self.flow.sources.index(gap_source)])
                async with trio.open_nursery() as nursery:
                    for source, outbox in feeds:
                        self._start_source(nursery, source, outbox)
                if gap_source is not None:
                    gap_source.close()  # the feeds ended: so does the stream of their gaps

    def _start_source(self, nursery: trio.Nursery, source: Any, outbox: Outbox) -> None:
        slot = next(s for s in self.slots if s.actor is source)
        nursery.start_soon(
            self._supervise, slot, lambda: source.run(outbox), self._closer(None, outbox)
        )

    async def _supervise(
        self, slot: _ActorSlot, call: Callable[[], Awaitable[Any]], close: Callable[[], None]
    ) -> None:
        m = slot.metrics
        try:
            while True:
                slot.state = "running"
                m.up.set(1)
                try:
                    await call()
                except Exception as exc:
                    if not await self._restart_after(slot, exc):
                        return
                else:
                    slot.state = "finished"
                    return
        finally:
            m.up.set(0)
            close()

    async def _restart_after(self, slot: _ActorSlot, exc: Exception) -> bool:
        """Count ``exc``, raised by ``slot``'s actor, and wait out its backoff
        before a restart; False when that spends the restart budget (the
        flow then fails)."""
        policy = self.flow.supervision
        name, m = slot.actor.name, slot.metrics
        m.up.set(0)
        m.error(type(exc).__name__)
        slot.last_error = redact(f"{type(exc).__name__}: {exc}")  # shown: /status, logs
        now = trio.current_time()
        recent = slot.crashes
        while recent and recent[0] < now - policy.window:
            recent.popleft()
        if not recent or slot.backoff is None:
            slot.backoff = policy.backoff  # healthy for a window: start over
        recent.append(now)
        if len(recent) > policy.max_restarts:
            slot.state = "failed"
            self._fail(slot, policy)
            return False
        slot.restarts += 1
        m.restarts.inc()
        slot.state = "restarting"
        backoff = slot.backoff
        log.warning(
            "flow %s: %s %s raised %s; restart %d in %.2fs",
            self.flow.name, slot.kind, name, slot.last_error, slot.restarts, backoff,
            exc_info=log.isEnabledFor(logging.DEBUG),
            extra=self._extra(name),
        )
        await trio.sleep(backoff)
        slot.backoff = min(max(backoff * 2, 0.01), policy.max_backoff)
        return True

    def _fail(self, slot: _ActorSlot, policy: Any) -> None:
        self._failure = (
            f"flow {self.flow.name!r}: {slot.kind} {slot.actor.name!r} failed "
            f"{policy.max_restarts + 1} times within {policy.window:g}s "
            f"(restart budget {policy.max_restarts}); last error: {slot.last_error}"
        )
        log.error("%s", self._failure, extra=self._extra(slot.actor.name))
        self.state = "failed"
        self._force()


async def run_flow(flow: Flow, **options: Any) -> RunResult:
    """Run ``flow`` to completion; see ``Runtime`` for the options.

    (Named run_flow, not run: ``flows.run`` is the CLI module.)
    """
    return await Runtime(flow, **options).run()
