#!/usr/bin/env bash
# Build dist/auxot-router.pyz and dist/auxot-worker.pyz: our code and registry.json in one file
# each. The dependencies (aiohttp, orjson, argon2-cffi, redis, fakeredis) have compiled parts that
# cannot load from a zip, so install them beside it: pip install -r requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}"
mkdir -p dist
for role in router worker; do
    stage="$(mktemp -d)"
    cp -r auxot_common "auxot_${role}.py" registry.json "$stage/"
    find "$stage" -name '__pycache__' -prune -exec rm -rf {} +
    printf 'import sys\n\nfrom auxot_%s import main\n\nsys.exit(main())\n' "$role" > "$stage/__main__.py"
    "$python" -m zipapp "$stage" -o "dist/auxot-${role}.pyz" -p "/usr/bin/env python3" -c
    rm -rf "$stage"
    echo "dist/auxot-${role}.pyz"
done
