#!/usr/bin/env bash
# Install everything, then run the full suite: lint, format, types, unit and end-to-end tests.
# Usage (as root on Debian): ./scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
need_root
install_system_packages
make_venv "[test]"
echo "==> ruff check"; .venv/bin/ruff check .
echo "==> ruff format --check"; .venv/bin/ruff format --check .
echo "==> mypy --strict sidecar"; .venv/bin/mypy --strict sidecar
echo "==> pytest"; .venv/bin/pytest "$@"
