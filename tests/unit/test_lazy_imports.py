"""What `sidecar run` imports at start-up: the heavy libraries that only some configurations
use are imported when first used, so that a sidecar that does not use them does not pay
their memory (issue 15: 1000 idle sessions within 40 MiB; cryptography alone is ~9 MiB)."""

from __future__ import annotations

import subprocess
import sys

# Imported on first use only: DANE's certificate checks, MTA-STS's policy fetch, the Redis
# shaping backend.
ON_FIRST_USE = ("cryptography", "httpx", "httpcore", "coredis")


def test_the_run_path_does_not_import_libraries_only_some_configurations_use() -> None:
    code = (
        "import sys\n"
        "import sidecar.cli, sidecar.server, sidecar.session, sidecar.workers\n"
        f"print(' '.join(m for m in {ON_FIRST_USE!r} if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
