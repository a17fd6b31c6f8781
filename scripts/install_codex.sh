#!/usr/bin/env bash
# Install the pinned OpenAI Codex CLI (npm @openai/codex, whose linux-x64 native binary ships as
# an npm optional dependency) into a cache outside the repository; print the path of `codex`.
set -euo pipefail
version="${AUXOT_CODEX_VERSION:-0.171.0}"
dir="${AUXOT_CACHE_DIR:-$HOME/.cache/auxot}/codex-$version"
bin="$dir/node_modules/.bin/codex"
if [[ ! -x "$bin" ]] || ! "$bin" --version >/dev/null 2>&1; then
    command -v npm >/dev/null 2>&1 || { echo "npm is needed to install the Codex CLI" >&2; exit 1; }
    mkdir -p "$dir"
    npm install --silent --no-audit --no-fund --prefix "$dir" "@openai/codex@$version" >&2
fi
"$bin" --version >/dev/null
echo "$bin"
