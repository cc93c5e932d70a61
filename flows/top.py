"""``python -m flows.top [URL]``: a live terminal view of a running flow.

Reads the flow's ``/status`` and ``/readyz`` (see ``flows/_server.py``)
every ``--interval`` seconds and shows, per actor: kind, name, state,
records/s in and out (from the difference of two samples; the first frame
shows averages since the flow started), p50/p99 batch processing time,
inbox use, send-wait share (seconds blocked on downstream per second),
utilization, drops by reason and health (the ``/readyz`` reasons, such as
an open circuit). The header has the flow's name, state, uptime and
readiness. The flow may run on another host: pass its URL.

Usage::

    python -m flows.top                          # http://127.0.0.1:9099
    python -m flows.top http://10.0.0.5:9100 --interval 2
    python -m flows.top --once                   # one snapshot; exit 1 if unreachable

Keys: ``q`` quits (when standard input is a terminal); Ctrl-C also quits.
Both exit 0 with the terminal restored. An unreachable flow does not end
the view: it says ``cannot reach URL: <error>; retrying`` and keeps the last
figures on screen.

Needs rich (the ``tui`` extra): ``pip install 'flows[tui]'``.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import httpx

from ._render import chain_line, graph_lines

try:
    from rich import box
    from rich.console import Console, Group
    from rich.live import Live
    from rich.table import Table
    from rich.text import Text
except ImportError:  # the tui extra is not installed; main() says so
    Console = None  # type: ignore[assignment,misc]

__all__ = ["Sample", "actor_rates", "fetch", "main", "render"]

DEFAULT_URL = "http://127.0.0.1:9099"
_STATE_STYLE = {
    "running": "green", "starting": "cyan", "draining": "yellow", "restarting": "yellow",
    "finished": "dim", "stopped": "dim", "failed": "bold red",
}


class Unreachable(Exception):
    """The flow's endpoints did not answer; the message says why."""


@attrs.frozen
class Sample:
    """One reading of a flow: its /status and its /readyz reasons."""

    status: dict[str, Any]
    ready: bool
    reasons: list[str]
    taken: float  # time.time() when read


def base_url(url: str) -> str:
    """``host:port`` or ``http://host:port[/status]`` -> ``http://host:port``."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    for suffix in ("/status", "/readyz", "/metrics", "/healthz"):
        url = url.removesuffix(suffix)
    return url


def fetch(client: httpx.Client, url: str) -> Sample:
    """Read ``url``/status and ``url``/readyz; raise Unreachable on failure."""
    try:
        response = client.get(f"{url}/status")
        if response.status_code != 200:
            raise Unreachable(f"HTTP {response.status_code} from {url}/status")
        status = response.json()
        ready_response = client.get(f"{url}/readyz")
        ready_body = ready_response.json() if ready_response.status_code in (200, 503) else {}
    except httpx.HTTPError as exc:
        raise Unreachable(str(exc) or type(exc).__name__) from None
    except ValueError as exc:  # not JSON: not a flow
        raise Unreachable(f"not a flow's endpoint ({exc})") from None
    if not isinstance(status, dict) or "actors" not in status:
        raise Unreachable(f"{url}/status is not a flow's status")
    return Sample(
        status=status,
        ready=bool(ready_body.get("ready", status.get("ready", False))),
        reasons=list(ready_body.get("reasons", [])),
        taken=time.time(),
    )


def _send_wait_sum(actor: dict[str, Any]) -> float:
    h = actor.get("send_wait_seconds") or {}
    return (h.get("count") or 0) * (h.get("mean") or 0.0)


def actor_rates(prev: Sample | None, cur: Sample) -> tuple[dict[str, dict[str, float | None]], str]:
    """Per-actor rates ``{name: {"in", "out", "send_wait"}}`` and what they cover.

    From the difference between ``prev`` and ``cur`` when both come from the
    same run of the same flow; else averages since the flow started.
    """
    now = cur.status
    then = prev.status if prev is not None else None
    dt = 0.0
    if then is not None and then.get("flow") == now.get("flow"):
        dt = now.get("uptime_seconds", 0.0) - then.get("uptime_seconds", 0.0)
    if dt > 0:
        before = {a["name"]: a for a in then["actors"]}  # type: ignore[index]
        window = f"last {dt:.1f}s"
    else:
        before, dt = {}, max(now.get("uptime_seconds", 0.0), 1e-9)
        window = "average since start"
    out: dict[str, dict[str, float | None]] = {}
    for a in now["actors"]:
        b = before.get(a["name"], {})
        kind = a.get("kind")

        def per_s(key: str, a: dict[str, Any] = a, b: dict[str, Any] = b) -> float:
            return max(0.0, (a.get(key, 0) - b.get(key, 0)) / dt)

        written = per_s("written") if "written" in a else None
        out[a["name"]] = {
            "in": per_s("received") if kind != "source" else None,
            "out": per_s("sent") if kind != "sink" else written,
            "send_wait": (
                max(0.0, (_send_wait_sum(a) - _send_wait_sum(b)) / dt) if kind != "sink" else None
            ),
        }
    return out, window


# -- formatting ---------------------------------------------------------------


def _rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f}µs"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def _count(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.1f}G"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def _uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _share(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if x < 0.995 else f"{100 * x:.0f}%"


def _graph(status: dict[str, Any]) -> list[str]:
    """A chain as one line (``src1, src2 → stage → sink1, sink2``), any other
    graph as one line per producer, with branches and edge policies."""
    line = chain_line(status)
    return [line] if line is not None else graph_lines(status)


def _health(actor: dict[str, Any], reasons: list[str]) -> Text:
    text = Text()
    for r in reasons:
        text.append(("; " if text else "") + r, style="red" if "open" in r else "yellow")
    if actor.get("restarts"):
        text.append(("; " if text else "") + f"{actor['restarts']} restarts", style="yellow")
        if actor.get("last_error"):
            text.append(f" (last: {actor['last_error']})", style="dim")
    fresh = actor.get("freshness") or {}
    if fresh.get("stale_symbols"):
        oldest = ", ".join(f"{s['symbol']} {_uptime(s['age_seconds'])}" for s in fresh["stalest"][:3])
        text.append(("; " if text else "") + f"{fresh['stale_symbols']} stale symbols", style="yellow")
        text.append(f" (oldest: {oldest})", style="dim")
    parked = actor.get("parked") or {}
    if parked.get("count"):
        names = ", ".join(parked["symbols"][:3]) + (", ..." if parked["count"] > 3 else "")
        text.append(("; " if text else "") + f"{parked['count']} parked", style="yellow")
        text.append(f" ({names})", style="dim")
    errors = actor.get("errors") or {}
    if errors:
        listed = ", ".join(f"{k}={_count(v)}" for k, v in sorted(errors.items()))
        text.append(("; " if text else "") + f"errors {listed}", style="red")
    return text if text else Text("ok", style="green")


def _reasons_for(actor: dict[str, Any], reasons: list[str]) -> list[str]:
    """The /readyz reasons that name this actor (``<kind> <name> ...``)."""
    mine = []
    for r in reasons:
        for prefix in (f"{actor['kind']} {actor['name']}", f"{actor['name']} "):
            if r.startswith(prefix) and (len(r) == len(prefix) or not r[len(prefix)].isalnum()):
                mine.append(r)
                break
        else:
            if f" {actor['name']} stands in" in r:
                mine.append(r)
    return mine


def render(
    url: str,
    sample: Sample | None,
    prev: Sample | None,
    error: str | None,
    interval: float,
    *,
    live: bool,
) -> Group:
    """The view: header, graph, the per-actor table, and an error line if any."""
    parts: list[Any] = []
    if sample is None:
        head = Text(f"flows.top  {url}", style="bold")
        parts.append(head)
        parts.append(Text("connecting..." if error is None else "", style="dim"))
    else:
        st = sample.status
        head = Text()
        head.append("flow ", style="dim").append(str(st.get("flow")), style="bold cyan")
        state = str(st.get("state"))
        head.append("  state ", style="dim").append(state, style=_STATE_STYLE.get(state, ""))
        head.append("  uptime ", style="dim").append(_uptime(st.get("uptime_seconds", 0.0)))
        head.append("  ready ", style="dim")
        head.append("yes" if sample.ready else "no", style="green" if sample.ready else "bold red")
        head.append(f"  {url}", style="dim")
        head.append("  " + time.strftime("%H:%M:%S", time.localtime(sample.taken)), style="dim")
        parts.append(head)
        for i, line in enumerate(_graph(st)):
            parts.append(Text.assemble(("graph " if i == 0 else "      ", "dim"), line))
        named: set[str] = set()
        rates, window = actor_rates(prev, sample)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, expand=False,
                      caption=f"records/s: {window} (a sink's out/s: records written); "
                      "drops: since start",
                      caption_justify="left", caption_style="dim")
        table.add_column("kind", style="dim", no_wrap=True)
        table.add_column("actor", style="bold", no_wrap=True)
        table.add_column("state", no_wrap=True)
        for title in ("in/s", "out/s", "p50", "p99", "buffer", "send-wait", "util"):
            table.add_column(title, justify="right", no_wrap=True)
        table.add_column("drops", overflow="fold")
        table.add_column("health", overflow="fold")
        for a in st["actors"]:
            r = rates.get(a["name"], {})
            proc = a.get("processing_seconds") or {}
            buf = a.get("buffer")
            if buf:
                used, cap = buf.get("used", 0), buf.get("capacity", 0) or 0
                fill = used / cap if cap else 0.0
                cell = Text(f"{used}/{cap:g}", style="red" if fill >= 0.9 else
                            "yellow" if fill >= 0.5 else "")
                if buf.get("pending_records"):
                    cell.append(f" +{_count(buf['pending_records'])}", style="dim")
            else:
                cell = Text("-", style="dim")
            drops = ", ".join(
                f"{k} {_count(v)}" for k, v in sorted(a.get("discarded", {}).items()) if v
            )
            mine = _reasons_for(a, sample.reasons)
            named.update(mine)
            state = str(a.get("state"))
            table.add_row(
                a.get("kind", "?"),
                a["name"],
                Text(state, style=_STATE_STYLE.get(state, "")),
                _rate(r.get("in")),
                _rate(r.get("out")),
                _seconds(proc.get("p50")),
                _seconds(proc.get("p99")),
                cell,
                _share(r.get("send_wait")),
                _share(a.get("utilization")),
                drops or "-",
                _health(a, mine),
            )
        parts.append(table)
        others = [r for r in sample.reasons if r not in named]
        if others:
            parts.append(Text("not ready: " + "; ".join(others), style="yellow"))
    if error is not None:
        retry = "; retrying" if live else ""
        parts.append(Text(f"cannot reach {url}: {error}{retry}", style="bold red"))
    if live:
        parts.append(Text(f"q quits · every {interval:g}s", style="dim"))
    return Group(*parts)


# -- the terminal -------------------------------------------------------------


class _Keys:
    """Non-blocking key reads: cbreak mode and select() when stdin is a tty."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self._saved: Any = None

    @contextmanager
    def cbreak(self) -> Iterator[_Keys]:
        try:
            import termios
            import tty
        except ImportError:  # not a POSIX terminal: Ctrl-C only
            yield self
            return
        if not sys.stdin.isatty():
            yield self
            return
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        try:
            tty.setcbreak(fd)
            self.fd = fd
            yield self
        finally:
            self.fd = None
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    def wait(self, timeout: float) -> str:
        """Keys typed within ``timeout`` seconds ('' if none)."""
        if timeout <= 0:
            return ""
        if self.fd is None:
            time.sleep(timeout)
            return ""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return ""
        data = os.read(self.fd, 64)
        return data.decode(errors="replace") if data else ""


def _run_live(console: Any, client: httpx.Client, url: str, interval: float) -> int:
    keys = _Keys()
    sample: Sample | None = None
    prev: Sample | None = None
    with keys.cbreak(), Live(console=console, auto_refresh=False, screen=True,
                             redirect_stdout=False, redirect_stderr=False) as live:
        next_poll = time.monotonic()
        while True:
            error = None
            try:
                new = fetch(client, url)
            except Unreachable as exc:
                error = str(exc)
            else:
                prev, sample = sample, new
            live.update(render(url, sample, prev, error, interval, live=True), refresh=True)
            next_poll = max(next_poll + interval, time.monotonic())
            while (remaining := next_poll - time.monotonic()) > 0:
                typed = keys.wait(remaining)
                if "q" in typed.lower():
                    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flows.top",
        description="A live terminal view of a running flow, read from its /status and /readyz.",
    )
    p.add_argument("url", nargs="?", default=DEFAULT_URL,
                   help="the flow's endpoint address (default: %(default)s)")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="seconds between samples (default: %(default)s)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot and exit (1 if the flow cannot be reached)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if Console is None:
        print("flows.top needs rich, which is not installed: pip install 'flows[tui]'",
              file=sys.stderr)
        return 2
    if not args.interval > 0:
        print("flows.top: --interval must be a positive number of seconds", file=sys.stderr)
        return 2
    url = base_url(args.url)
    timeout = httpx.Timeout(max(0.5, min(5.0, args.interval * 2)))
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(width=width)
    with httpx.Client(timeout=timeout) as client:
        if args.once:
            try:
                sample = fetch(client, url)
            except Unreachable as exc:
                print(f"flows.top: cannot reach {url}: {exc}", file=sys.stderr)
                return 1
            console.print(render(url, sample, None, None, args.interval, live=False))
            return 0
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # restore the terminal
        try:
            return _run_live(console, client, url, args.interval)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
