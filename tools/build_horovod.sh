#!/usr/bin/env bash
# Builds a Horovod 0.28.1 wheel that works with torch >= 2.1 and caches it.
#
# Why: the last Horovod release compiles its torch extension and Gloo as C++14/C++11, while torch >= 2.1
# headers need C++17 (upstream fixed this in PR #3998 but never released it). We patch the sdist to C++17
# throughout (top level, torch extension and Gloo must agree or the link fails), build with Gloo and no MPI,
# and keep the wheel in $CACHE/wheels/<key>/ keyed on the torch and Python versions, so only the first
# setup on a machine pays the ~8 minute compile.
#
# Usage: tools/build_horovod.sh VENV_PYTHON CACHE_DIR   -> prints the cached wheel's path on stdout
set -euo pipefail
PY=$1
CACHE=$2
HVD_VERSION=0.28.1

key=$("$PY" -c 'import sys, torch; print("horovod-%s-torch%s-cp%d%d" % (sys.argv[1], torch.__version__.split("+")[0], *sys.version_info[:2]))' "$HVD_VERSION")
out="$CACHE/wheels/$key"
if compgen -G "$out/horovod-$HVD_VERSION-*.whl" >/dev/null; then
    ls "$out"/horovod-$HVD_VERSION-*.whl
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building $key (one-time, about 8 minutes on 2 cores)..." >&2
"$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HVD_VERSION" -d "$work" >&2
tar -xzf "$work/horovod-$HVD_VERSION.tar.gz" -C "$work"
src="$work/horovod-$HVD_VERSION"

# C++17 everywhere: top level, torch extension, and the Gloo that both link against.
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
sed -i 's/-std=c++11 -fPIC/-std=c++17 -fPIC/' "$src/third_party/gloo/CMakeLists.txt"
if grep -q 'CMAKE_CXX_STANDARD 14' "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt" \
   || ! grep -q -- '-std=c++17 -fPIC' "$src/third_party/gloo/CMakeLists.txt"; then
    echo "dlpipe setup: the Horovod $HVD_VERSION sdist no longer matches the C++17 patch; see tools/build_horovod.sh" >&2
    exit 1
fi

venv_bin=$(cd "$(dirname "$PY")" && pwd)
export PATH="$venv_bin:$PATH"          # the venv's cmake 3.x, not a system cmake 4 that rejects Gloo's minimum
export CMAKE_POLICY_VERSION_MINIMUM=3.5
export HOROVOD_CMAKE="$venv_bin/cmake"
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=gloo
export MAKEFLAGS="-j$(nproc)"
"$PY" -m pip wheel --no-deps --no-build-isolation -w "$work/dist" "$src" >&2

mkdir -p "$CACHE/wheels"
tmp_out="$out.tmp.$$"
rm -rf "$tmp_out"
mkdir -p "$tmp_out"
cp "$work"/dist/horovod-$HVD_VERSION-*.whl "$tmp_out/"
mv "$tmp_out" "$out"   # atomic: a killed build never leaves a half-copied wheel in the cache
ls "$out"/horovod-$HVD_VERSION-*.whl
