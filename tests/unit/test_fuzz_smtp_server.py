"""Runs the atheris fuzz target of the SMTP server core for a bounded number of inputs (in CI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).parents[2] / "fuzz"


def test_smtp_server_fuzz_target_bounded_run(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    shutil.copytree(FUZZ / "corpus", corpus)  # libFuzzer adds what it finds to its corpus
    result = subprocess.run(
        [
            sys.executable,
            str(FUZZ / "fuzz_smtp_server.py"),
            "-runs=20000",
            "-max_len=1024",
            "-seed=1",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
