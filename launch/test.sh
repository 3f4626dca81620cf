#!/usr/bin/env bash
# Set everything up, then run the whole test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
exec .venv/bin/python -m pytest "$@"
