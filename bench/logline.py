"""Micro-benchmark of the per-transaction log line (issue 15): microseconds per
``log_transaction`` call with the handler ``sidecar run`` configures (stderr redirected to a
file, as a container's stdout is), text and JSON, and with the level at WARNING (the line off).

    .venv/bin/python bench/logline.py [--lines 20000] [--rounds 5]

Prints the median of the rounds per format. No sockets, no trio.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

from sidecar.logs import configure_logging, log_transaction, shutdown_logging

FIELDS: dict[str, object] = {
    "session": "1f3a9c",
    "client": "192.0.2.10:53712",
    "listener": "127.0.0.1:2525",
    "binding": "b1",
    "proxy": "10.0.0.5:5000",
    "source": "203.0.113.7",
    "mx": "mx1.example.com",
    "mx_address": "198.51.100.25:25",
    "tls": "TLSv1.3",
    "tls_fallback": None,
    "site": None,
    "shaping_wait": 0.0,
    "rcpt": "1/0/0",
    "outcome": "delivered",
    "reply": "250 2.0.0 Ok: queued as 4XyZ1k2Lm3",
    "bytes": 2048,
    "duration": 0.012,
}


def per_line_us(level: str, log_format: str, lines: int) -> float:
    """Microseconds of CPU per log_transaction call, flush at the end included."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            configure_logging(level, "json" if log_format == "json" else "text")
            started = time.process_time()
            for _ in range(lines):
                log_transaction(FIELDS)
            shutdown_logging()
            used = time.process_time() - started
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
    logging.getLogger().handlers.clear()
    return used / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = [("info", "text"), ("info", "json"), ("warning", "text")]
    results: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case in cases:
            results[case].append(per_line_us(*case, args.lines))
    for (level, log_format), values in results.items():
        print(f"{level:8} {log_format:5} {statistics.median(values):7.2f} us per line")


if __name__ == "__main__":
    main()
