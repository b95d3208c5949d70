#!/usr/bin/env bash
# The project's test command: sets up .venv (idempotent), then runs the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k memory).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_venv.sh
bash scripts/setup_ros.sh
export HQSMEM_NO_SKIPS=1
exec .venv/bin/python -m pytest test -q -p no:cacheprovider "$@"
