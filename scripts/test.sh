#!/usr/bin/env bash
# Install what the tests need, start the loopback servers they use, run the whole suite.
# This is the README's test command and what CI (.ci/run) runs. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
