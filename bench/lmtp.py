#!/usr/bin/env python3
"""The LMTP recipe against the ``recipient_limit = 1`` recipe (issue 16): the same batch of
messages, each to 4 recipients in 3 domains (2 in one), from a real Postfix through the
sidecar to one TestMX per domain; transactions and bytes the MXes receive, and the time to
empty Postfix's queue.

It runs ``tests/e2e/test_lmtp_mta.py::test_bench_lmtp_against_recipient_limit_1`` (the e2e
harness starts HAProxy, dnsmasq, the MXes, Postfix) with the batch size set, and writes its
figures to ``bench/lmtp-results.txt``. Run as root from the repository root::

    .venv/bin/python bench/lmtp.py --messages 100 --size 20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100, help="messages in the batch")
    parser.add_argument("--size", type=int, default=20_000, help="body octets per message")
    parser.add_argument("--output", default=str(ROOT / "bench" / "lmtp-results.txt"))
    args = parser.parse_args()
    env = {
        **os.environ,
        "LMTP_BENCH_MESSAGES": str(args.messages),
        "LMTP_BENCH_SIZE": str(args.size),
        "LMTP_BENCH_OUTPUT": args.output,
    }
    test = "tests/e2e/test_lmtp_mta.py::test_bench_lmtp_against_recipient_limit_1"
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "pytest"), "-q", "-p", "no:randomly", test],
        cwd=ROOT,
        env=env,
        check=False,
    )
    if done.returncode == 0:
        print(Path(args.output).read_text(), end="")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
