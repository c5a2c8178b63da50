#!/usr/bin/env bash
# Set the machine up (idempotent, fast when done), run the linters, then the whole test suite,
# or the pytest arguments given: bash scripts/test.sh [PYTEST ARGS...]
#
# The linters (configured in pyproject.toml) run first, each timed, and any finding fails the
# run before pytest starts:
#   ruff check   style and likely bugs (E, F, W, B, UP) in certd/, tests/, bench/, scripts/
#   mypy         types: strict for certd.core and certd.engine, normal for the rest of certd/ and bench/
#   lint-imports the layers core <- config <- edges <- engine <- daemon <- cli, and no cycles
# CERTD_LINT=0 skips them (e.g. while iterating on one test file).
#
# Exit status is pytest's, except that "no tests collected" (5) is a failure too (1):
# a suite that silently runs nothing must not pass CI.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

# lint NAME COMMAND...: run one linter, print how long it took, fail the run on a finding.
lint() {
    local name="$1" started status=0
    shift
    started=$EPOCHREALTIME
    "$@" || status=$?
    awk -v name="$name" -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "test.sh: %s: %.1f s\n", name, b - a }' >&2
    if [[ $status -ne 0 ]]; then
        echo "test.sh: $name found problems (exit $status; see above): failing before the tests" >&2
        exit 1
    fi
}

if [[ "${CERTD_LINT:-1}" != "0" ]]; then
    lint "ruff check" .venv/bin/ruff check --quiet certd tests bench scripts
    lint "mypy" .venv/bin/mypy
    lint "lint-imports" .venv/bin/lint-imports --no-logo
fi

if [[ $# -eq 0 ]]; then
    set -- tests --durations=25  # the whole suite: also print its 25 slowest tests (the CI budget)
fi
status=0
.venv/bin/python -m pytest -q "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "test.sh: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$status"
