#!/usr/bin/env bash
# Install and start the router with the embedded Redis (no other service needed).
# On the first run, with no keys configured, it generates an API key and a GPU key, prints them
# once, and stores only their Argon2id hashes in .env (mode 0600).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
if [[ -z "${AUXOT_API_KEY_HASH:-}" && ! -f .env ]]; then
    .venv/bin/python auxot_router.py setup --write-env
fi
exec .venv/bin/python auxot_router.py "$@"
