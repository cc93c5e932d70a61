"""Scrape storm: an unthrottled flow's throughput while 50 clients hammer its endpoints.

What it measures: input records/s of a flow running as fast as it can
(``SyntheticMarket(symbols=1000, interval=0)`` -> ``ChangeDetector(rel=0.0005)``
-> a sink that counts and acks), with its endpoints served on
``127.0.0.1:0`` by ``flows.Runtime`` (prometheus_client's global registry,
process collectors included, as ``python -m flows.run`` has), in windows
of ``--seconds`` each, one flow run throughout:

    quiet, storm /metrics, quiet, storm /status, quiet   (x --rounds, one last quiet)

A storm is ``--clients`` concurrent clients in a separate process (this
script run with ``--storm``), so they do not share the flow's thread or
GIL: one thread and one ``httpx.Client`` each (keep-alive, httpx's default
``Accept-Encoding``, so gzip), issuing GETs back to back for ``--seconds``.
The flow's window starts when the scraper process says every client is
ready and ends ``--seconds`` later.

Columns: ``records/s`` (input records per wall second) and ``rec/CPU-s``
(per CPU second of the flow's process: what the server takes from the
flow, whatever else runs on the machine); ``quiet`` is the mean of the
quiet windows (listed, their spread shows the machine's noise) and each
storm's ``ratio`` is its figure over ``quiet``'s; ``scrapes/s`` are the
answers the scrapers got within the window, per second, and
``responses`` those answers by status (or by error).

``--endpoint-cache`` and ``--endpoint-rate`` are passed to ``Runtime``:
``--endpoint-cache 0 --endpoint-rate none`` serves as the endpoints did
before answers were reused and requests paced (every request computed).

Target (PASS/FAIL by ``--clock``, wall by default; the exit status is 0
either way): each storm leaves the flow at least 70% of its quiet
throughput.

Run from the repository root (about a minute with the defaults)::

    python bench/scrape.py
    python bench/scrape.py --endpoint-cache 0 --endpoint-rate none   # no reuse, no pacing
    python bench/scrape.py --clients 50 --seconds 10 --rounds 2 --clock cpu
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET = 0.70
PATHS = ("/metrics", "/status")


# -- the scrapers (a separate process) --------------------------------------------


def storm(url: str, path: str, clients: int, seconds: float) -> None:
    """``clients`` threads GET ``url + path`` back to back for ``seconds``;
    print ``ready`` when they all start and, at the end, a JSON object of
    the responses answered within ``seconds``, by status (or error)."""
    import httpx

    counts: list[dict[str, int]] = [{} for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    deadline = [0.0]

    def scrape(i: int) -> None:
        seen = counts[i]
        with httpx.Client(base_url=url, timeout=60.0) as client:
            ready.wait()
            while time.monotonic() < deadline[0]:
                try:
                    status = str(client.get(path).status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                if time.monotonic() <= deadline[0]:  # not the last, late answers
                    seen[status] = seen.get(status, 0) + 1

    threads = [threading.Thread(target=scrape, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline[0] = time.monotonic() + 3600.0
    ready.wait()  # every client made
    deadline[0] = time.monotonic() + seconds
    print("ready", flush=True)
    for t in threads:
        t.join()
    total: dict[str, int] = {}
    for seen in counts:
        for status, n in seen.items():
            total[status] = total.get(status, 0) + n
    print(json.dumps(total), flush=True)


# -- the flow (this process) ---------------------------------------------------------


class CountingSink:
    """Sink: counts the records it receives, acks and drops them."""

    def __init__(self, *, name: str = "null") -> None:
        self.name = name
        self.n = 0

    async def run(self, inbox: Any) -> None:
        async for batch in inbox:
            self.n += len(batch.records)
            batch.ack("written")


@dataclass
class Window:
    name: str  # "quiet" or the path stormed
    wall: float  # input records per second
    cpu: float  # input records per CPU second of this process
    served: float = 0.0  # 200 responses per second
    statuses: dict[str, int] = field(default_factory=dict)  # responses by status (or error)


async def run_bench(args: argparse.Namespace) -> list[Window]:
    import trio

    from flows import ChangeDetector, Flow, Runtime
    from sources.synthetic import SyntheticMarket

    source = SyntheticMarket(symbols=args.symbols, interval=0, batch_size=args.batch_size)
    flow = Flow("storm", sources=[source], stages=[ChangeDetector(rel=0.0005)],
                sinks=[CountingSink()])
    runtime = Runtime(flow, metrics_addr="127.0.0.1:0", drain_timeout=5.0,
                      endpoint_cache=args.endpoint_cache, endpoint_rate=args.endpoint_rate)
    windows: list[Window] = []

    async def window() -> tuple[float, float]:
        n0, t0, c0 = source.emitted, time.perf_counter(), time.process_time()
        await trio.sleep(args.seconds)
        n = source.emitted - n0
        return n / (time.perf_counter() - t0), n / (time.process_time() - c0)

    async def quiet() -> None:
        windows.append(Window("quiet", *await window()))

    async def stormy(path: str) -> None:
        assert runtime.metrics_url is not None
        command = [sys.executable, __file__, "--storm", runtime.metrics_url, path,
                   "--clients", str(args.clients), "--seconds", str(args.seconds)]
        process = await trio.lowlevel.open_process(command, stdout=subprocess.PIPE)
        try:
            lines = _lines(process.stdout)
            assert await lines.__anext__() == "ready"
            wall, cpu = await window()
            statuses = json.loads(await lines.__anext__())
        finally:
            with trio.CancelScope(shield=True):
                await process.wait()
        windows.append(Window(path, wall, cpu, statuses.get("200", 0) / args.seconds, statuses))

    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        await trio.sleep(1.0)  # warm-up
        for _ in range(args.rounds):
            for path in PATHS:
                await quiet()
                await stormy(path)
        await quiet()
        runtime.stop()
    return windows


async def _lines(stream: Any):
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some()
            if not chunk:
                raise EOFError("the scraper process ended early")
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        yield line.decode().strip()


def _rate(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent scrapers (default 50)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of each window, quiet or storm (default 10)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of (quiet, storm /metrics, quiet, storm /status) (default 1)")
    parser.add_argument("--symbols", type=int, default=1000, help="synthetic universe (default 1000)")
    parser.add_argument("--batch-size", type=int, default=1000, help="records per batch (default 1000)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="judge the target on records per second (default) or per CPU "
                             "second of the flow's process")
    parser.add_argument("--endpoint-cache", type=float, default=0.5, metavar="SECONDS",
                        help="Runtime(endpoint_cache=...): 0 computes every answer (default 0.5)")
    parser.add_argument("--endpoint-rate", type=_rate, default=20.0, metavar="RATE",
                        help="Runtime(endpoint_rate=...): requests/s per endpoint, or 'none' "
                             "for no limit (default 20)")
    parser.add_argument("--storm", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.storm:
        storm(*args.storm, args.clients, args.seconds)
        return 0
    if args.clients < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--clients, --seconds and --rounds must be positive")

    import trio

    print(f"flow: SyntheticMarket(symbols={args.symbols}, interval=0, batch_size={args.batch_size})"
          f" -> ChangeDetector(rel=0.0005) -> counting sink; endpoints on 127.0.0.1:0; "
          f"{args.clients} clients x {args.seconds:g}s per storm (separate process); "
          f"{args.rounds} round(s); endpoint_cache={args.endpoint_cache:g}, "
          f"endpoint_rate={args.endpoint_rate}; python {sys.version.split()[0]}, trio {trio.__version__}")
    windows = trio.run(run_bench, args)
    quiet = [w for w in windows if w.name == "quiet"]
    base_wall = sum(w.wall for w in quiet) / len(quiet)
    base_cpu = sum(w.cpu for w in quiet) / len(quiet)
    print()
    print(f"{'window':<15} {'records/s':>11} {'ratio':>6} {'rec/CPU-s':>11} {'ratio':>6} "
          f"{'scrapes/s':>10}  {'responses':<12} result ({args.clock})")
    print(f"{'quiet':<15} {base_wall:>11,.0f} {1:>6.2f} {base_cpu:>11,.0f} {1:>6.2f} {'-':>10}  "
          f"{len(quiet)} windows: " + ", ".join(f"{w.wall:,.0f}" for w in quiet) + " records/s")
    for path in PATHS:
        storms = [w for w in windows if w.name == path]
        wall = sum(w.wall for w in storms) / len(storms)
        cpu = sum(w.cpu for w in storms) / len(storms)
        served = sum(w.served for w in storms) / len(storms)
        statuses: dict[str, int] = {}
        for w in storms:
            for status, n in w.statuses.items():
                statuses[status] = statuses.get(status, 0) + n
        ratio = wall / base_wall if args.clock == "wall" else cpu / base_cpu
        verdict = "PASS" if ratio >= TARGET else "FAIL"
        shown = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
        print(f"{'storm ' + path:<15} {wall:>11,.0f} {wall / base_wall:>6.2f} {cpu:>11,.0f} "
              f"{cpu / base_cpu:>6.2f} {served:>10,.0f}  {shown:<12} {verdict} (>= {TARGET:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
