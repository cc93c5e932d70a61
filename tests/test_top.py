"""`python -m flows.top`: the live terminal view of a running flow.

The flow is the built-in demo, run as a subprocess (`python -m flows.run`)
on a free port for the whole module. The live view is driven in a real
terminal with tmux (skipped when tmux is missing).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop("COLUMNS", None)
ACTORS = ("synthetic", "change", "sqlite", "console")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flow_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("top")
    url = f"http://127.0.0.1:{free_port()}"
    # --duration only ends a flow the teardown's SIGINT missed: it must outlast
    # the module on a loaded machine, where the live view test runs last
    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.run", "--metrics-addr", url.removeprefix("http://"),
         "--duration", "600", "--db", str(tmp / "ticks.db")],
        cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the flow exited {proc.returncode}: {proc.stderr.read()}")
            try:  # until the change detector has dropped unchanged ticks
                actors = httpx.get(f"{url}/status").json()["actors"]
                if any(a["discarded"].get("unchanged") for a in actors):
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the flow's /status did not show a second tick within 15 s")
            time.sleep(0.05)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def top(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.top", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_once_prints_a_snapshot_of_every_stage(flow_url):
    result = top(flow_url, "--once")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "flow demo" in out and "state running" in out and "ready yes" in out
    assert "graph synthetic → change → sqlite, console" in out
    for actor in ACTORS:
        line = next(line for line in out.splitlines() if f" {actor} " in f" {line} "
                    and "running" in line)
        assert line.split()[0] in ("source", "stage", "sink")
    for column in ("in/s", "out/s", "p50", "p99", "buffer", "send-wait", "util", "drops"):
        assert column in out
    assert "unchanged" in out  # the change detector's drops, by reason
    # host:port and /status URLs work too.
    again = top(flow_url.removeprefix("http://") + "/status", "--once")
    assert again.returncode == 0 and "flow demo" in again.stdout


def test_once_unreachable_exits_1_with_a_clear_message():
    url = f"http://127.0.0.1:{free_port()}"
    result = top(url, "--once")
    assert result.returncode == 1
    assert result.stderr.startswith(f"flows.top: cannot reach {url}: ")
    assert result.stdout == ""


def test_without_rich_it_says_how_to_install_it():
    code = ("import runpy, sys; sys.modules['rich'] = None; sys.argv = ['flows.top', '--once'];"
            "runpy.run_module('flows.top', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2
    assert "pip install 'flows[tui]'" in result.stderr


@pytest.fixture
def top_module():
    """flows.top, imported here and forgotten afterwards: like flows.run it is a
    CLI module, not part of the public surface that test_exports checks."""
    import flows.top

    yield flows.top
    sys.modules.pop("flows.top", None)
    if hasattr(flows, "top"):
        delattr(flows, "top")


def test_rates_come_from_successive_samples(top_module):
    Sample, actor_rates = top_module.Sample, top_module.actor_rates

    def sample(uptime: float, sent: int, received: int, wait_count: int) -> Any:
        actors = [
            {"name": "src", "kind": "source", "sent": sent, "received": 0,
             "send_wait_seconds": {"count": wait_count, "mean": 0.01}},
            {"name": "out", "kind": "sink", "sent": 0, "received": received, "written": received},
        ]
        return Sample({"flow": "f", "uptime_seconds": uptime, "actors": actors}, True, [], 0.0)

    first, second = sample(10.0, 1000, 900, 100), sample(12.0, 3000, 2900, 300)
    rates, window = actor_rates(first, second)
    assert window == "last 2.0s"
    assert rates["src"] == {"in": None, "out": 1000.0, "send_wait": pytest.approx(1.0)}
    assert rates["out"] == {"in": 1000.0, "out": 1000.0, "send_wait": None}
    rates, window = actor_rates(None, first)  # one sample: averages since start
    assert window == "average since start" and rates["src"]["out"] == 100.0
    rates, window = actor_rates(second, first)  # the flow restarted
    assert window == "average since start"
    assert top_module.base_url("10.0.0.5:9100/status/") == "http://10.0.0.5:9100"


def test_health_comes_from_readyz_reasons(top_module):
    from rich.console import Console

    actors = [
        {"name": "binance", "kind": "source", "state": "running", "sent": 10, "received": 0,
         "restarts": 2, "last_error": "ConnectError: refused", "discarded": {}, "errors": {}},
        {"name": "backup", "kind": "source", "state": "running", "sent": 5, "received": 0,
         "restarts": 0, "discarded": {}, "errors": {},
         "parked": {"count": 2, "symbols": ["NOPEUSDT", "OLDUSDT"]}},
        {"name": "db", "kind": "sink", "state": "running", "sent": 0, "received": 15,
         "restarts": 0, "discarded": {"rejected": 1}, "errors": {"OperationalError": 3},
         "buffer": {"used": 8, "capacity": 8}},
    ]
    reasons = ["flow is draining", "source binance: circuit open",
               "degraded: backup stands in for binance"]
    status = {"flow": "f", "state": "draining", "uptime_seconds": 5.0, "ready": False,
              "actors": actors, "edges": [{"from": "binance", "to": "db", "policy": "conflate"},
                        {"from": "backup", "to": "db", "policy": "conflate"}]}
    sample = top_module.Sample(status, False, reasons, 0.0)
    console = Console(width=220, record=True, file=io.StringIO())
    console.print(top_module.render("http://h:1", sample, None, None, 1.0, live=False))
    text = console.export_text()
    rows = {line.split()[1]: line for line in text.splitlines()
            if line.split()[:1] in (["source"], ["sink"])}
    assert "source binance: circuit open" in rows["binance"]
    assert "2 restarts (last: ConnectError: refused)" in rows["binance"]
    assert "degraded: backup stands in for binance" in rows["backup"]
    assert "2 parked (NOPEUSDT, OLDUSDT)" in rows["backup"]
    assert "8/8" in rows["db"] and "rejected 1" in rows["db"]
    assert "errors OperationalError=3" in rows["db"]
    assert "not ready: flow is draining" in text
    assert "ready no" in text and "graph binance, backup → [conflate] db" in text


# -- the live view in a real terminal ---------------------------------------------------


class Tmux:
    def __init__(self, tmp: Path) -> None:
        self.socket = f"flows-top-{os.getpid()}-{tmp.name}"
        self.tmp = tmp

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, check=check, timeout=10)

    def start(self, *top_args: str) -> None:
        """Run flows.top in a 160x40 terminal; its exit code and the terminal's
        settings after it are written to files (each whole: written, then
        renamed, so a file that exists is complete)."""
        script = self.tmp / "run.sh"
        script.write_text(
            "#!/bin/bash\n"
            f"cd {ROOT}\n"
            f"PYTHONPATH={ROOT} {sys.executable} -m flows.top {' '.join(top_args)}\n"
            f"echo $? > {self.tmp / 'rc.part'}\n"
            f"stty -a > {self.tmp / 'stty.part'}\n"
            f"mv {self.tmp / 'rc.part'} {self.tmp / 'rc'}\n"
            f"mv {self.tmp / 'stty.part'} {self.tmp / 'stty'}\n"
        )
        env = {k: v for k, v in ENV.items() if k != "TMUX"}
        subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", "new-session", "-d",
                        "-s", "top", "-x", "160", "-y", "40", f"bash {script}"],
                       env=env, check=True, timeout=10)

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top", check=False).stdout

    def wait_screen(self, *needles: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                pytest.fail(f"the view never showed {needles}; screen:\n{text}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float = 10) -> int:
        rc = self.tmp / "rc"
        deadline = time.monotonic() + timeout
        while not (self.tmp / "stty").exists():  # renamed last: both are complete
            if time.monotonic() > deadline:
                pytest.fail(f"flows.top did not exit; screen:\n{self.screen()}")
            time.sleep(0.05)
        return int(rc.read_text())

    def terminal_restored(self) -> bool:
        settings = (self.tmp / "stty").read_text().split()
        return "icanon" in settings and "echo" in settings

    def kill(self) -> None:
        self("kill-server", check=False)


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    t = Tmux(tmp_path)
    yield t
    t.kill()


def test_live_view_shows_the_stages_and_quits_on_q(tmux, flow_url):
    tmux.start(flow_url, "--interval", "0.5")
    screen = tmux.wait_screen(*ACTORS, "flow demo", "q quits")
    tmux.wait_screen("last 0.5s")  # the second sample gives rates over the interval
    assert "cannot reach" not in screen
    tmux("send-keys", "-t", "top", "q")
    assert tmux.wait_exit() == 0
    assert tmux.terminal_restored()


def test_live_view_says_when_the_flow_is_unreachable_and_stops_on_ctrl_c(tmux):
    url = f"http://127.0.0.1:{free_port()}"
    tmux.start(url, "--interval", "0.5")
    tmux.wait_screen(f"cannot reach {url}: ", "; retrying")
    tmux("send-keys", "-t", "top", "C-c")
    assert tmux.wait_exit() == 0
    assert tmux.terminal_restored()
