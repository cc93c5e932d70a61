"""What the benchmarks share: synthetic input, a source that only sends it,
and the exchange emulator as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows import Batch, Outbox
from sources.synthetic import SyntheticMarket


def make_records(n: int, **market: Any) -> list[Any]:
    """``n`` ticks from ``SyntheticMarket(seed=1, **market)``, whole
    universes at a time (the last one cut)."""
    source = SyntheticMarket(seed=1, **market)
    records: list[Any] = []
    while len(records) < n:
        records.extend(source.tick())
    return records[:n]


def cut(records: list[Any], size: int) -> list[list[Any]]:
    return [records[i : i + size] for i in range(0, len(records), size)]


class PregenSource:
    """Source: sends pre-generated record lists, one Batch each, then ends
    (no per-batch metrics, unlike ``flows.testing.ListSource``: the
    benchmarks measure what comes after the source). ``tag``: the batches'
    ``source`` (``Batch.source``), as flows' sources set it: every record
    of the input must have that source."""

    def __init__(self, batches: list[list[Any]], *, name: str = "pregen",
                 tag: str | None = None) -> None:
        self.batches = batches
        self.name = name
        self.tag = tag

    async def run(self, outbox: Outbox) -> None:
        send, tag = outbox.send, self.tag
        for records in self.batches:
            await send(Batch(records, source=tag))


def start_emulator(options: list[str]) -> tuple[subprocess.Popen[str], str]:
    """``python -m flows.testing.emulator`` on 127.0.0.1, a free port, with
    ``options``: (the process, its base URL)."""
    cmd = [sys.executable, "-m", "flows.testing.emulator", "--host", "127.0.0.1", "--port", "0",
           *options]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        stop_process(proc)
        raise RuntimeError(f"the emulator did not start (said {url!r})")
    return proc, url


def stop_process(proc: subprocess.Popen[str]) -> None:
    """Terminate ``proc``, killing it if it has not ended after 5 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
