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
