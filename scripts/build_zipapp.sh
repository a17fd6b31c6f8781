#!/usr/bin/env bash
# Build the zipapps: dist/auxot-{router,worker}-linux-{x86_64,aarch64}.pyz, each carrying our code,
# registry.json and its dependencies for CPython 3.11-3.14 (see scripts/build_zipapp.py; arguments
# go to it). dist/auxot-{router,worker}.pyz are the builds for this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
exec "$python" scripts/build_zipapp.py "$@"
