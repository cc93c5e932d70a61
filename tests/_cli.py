"""Running ``python -m flows.run`` from tests, against this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the CLI to completion; the caller checks the exit code."""
    return subprocess.run(
        [sys.executable, "-m", "flows.run", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV, check=False,
    )


def kill_mid_run_then_finish(flow_file: str, cwd: Path, *, speed: float, written: str,
                             kill_after: float, check_running: bool = False
                             ) -> subprocess.CompletedProcess[str]:
    """Run ``flow_file`` (it paces its replay by the SPEED environment
    variable) at ``speed`` so a kill lands mid-run; SIGKILL it
    ``kill_after`` s after it has written ``written`` (a checkpoint); then
    run it again flat out (SPEED 0) to the end and return that run. With
    ``check_running``, the first run must still be running at the kill."""
    import signal
    import time

    cmd = [sys.executable, "-m", "flows.run", flow_file, "--metrics-addr", "0"]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**ENV, "SPEED": str(speed)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (cwd / written).exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint written"
            time.sleep(0.01)
        time.sleep(kill_after)  # where the kill lands, not a synchronization
        assert not check_running or proc.poll() is None, "the flow ended before the kill"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return subprocess.run(cmd, check=False, cwd=cwd, env={**ENV, "SPEED": "0"},
                          capture_output=True, text=True, timeout=60)
