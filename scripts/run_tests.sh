#!/usr/bin/env bash
# Set up ./.venv and run the whole test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
python -m pytest -q -ra --durations=15 tests "$@"
