#!/usr/bin/env bash
# Set the machine up (idempotent, fast when done) and run the whole test suite, or the
# pytest arguments given: bash scripts/test.sh [PYTEST ARGS...]
# Exit status is pytest's, except that "no tests collected" (5) is a failure too (1):
# a suite that silently runs nothing must not pass CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

if [[ $# -eq 0 ]]; then
    set -- tests
fi
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
