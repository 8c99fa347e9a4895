#!/usr/bin/env bash
# Installs what the tests need (scripts/install.sh), then runs the whole suite, slow integration tests included.
# Extra arguments go to pytest (e.g. -m "not slow" for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
