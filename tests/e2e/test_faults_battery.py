"""The fault battery (``bench/faults.py``, issue 5) in CI: a short run of every scenario against
a real ``sidecar run`` process, HAProxy and dnsmasq; every must-be-0 figure must be 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_fault_battery_short_run(tmp_path: Path) -> None:
    output = tmp_path / "faults-results.txt"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faults.py"), "--rounds", "2", "--output", output],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    figures = output.read_text()
    assert "OK: every must-be-0 figure is 0" in figures
    assert "sidecar exit status after SIGTERM" in figures
