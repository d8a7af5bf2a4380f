#!/usr/bin/env bash
# Set up ./.venv, validate every available backend against the reference path (and the
# reference against the published fixtures), then benchmark them. Extra arguments go to bench.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
grl-kernels info
grl-kernels check
grl-kernels bench --quick "$@"
