#!/usr/bin/env bash
# Creates .venv with the whole dlpipe stack (Spark, Petastorm, Horovod, PyTorch CPU, MLflow).
# The Makefile calls this only when pyproject.toml, constraints.txt or this script changed, so a second
# `make setup` does nothing. Running it by hand again is safe: every step is an idempotent pip install.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
CACHE=${DLPIPE_CACHE:-.cache}

die() { echo "dlpipe setup: $*" >&2; exit 1; }

# --- prerequisites, each failing with one line that says what to install ---------------------------
command -v "$PYTHON" >/dev/null 2>&1 \
    || die "Python 3.11 not found as '$PYTHON': install Python 3.11 (e.g. apt-get install python3.11 python3.11-venv) or run with PYTHON=/path/to/python3.11"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "'$PYTHON' does not run: install Python 3.11 or run with PYTHON=/path/to/python3.11"
[ "$pyver" = "3.11" ] \
    || die "Python 3.11 is required, but '$PYTHON' is Python $pyver: install Python 3.11 or run with PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null \
    || die "Python 3.11 has no venv/ensurepip module: install it (e.g. apt-get install python3.11-venv)"

JAVA=java
[ -n "${JAVA_HOME:-}" ] && JAVA="$JAVA_HOME/bin/java"
command -v "$JAVA" >/dev/null 2>&1 \
    || die "Java not found: Spark 3.5 needs Java 8, 11 or 17 (e.g. apt-get install openjdk-17-jre-headless) on PATH or in JAVA_HOME"
jline=$("$JAVA" -version 2>&1 | head -n 1)
jmajor=$(echo "$jline" | sed -E 's/.*version "([0-9]+)(\.([0-9]+))?.*/\1 \3/' | awk '{ if ($1 == 1) print $2; else print $1 }')
case "$jmajor" in
    8|11|17) ;;
    *) die "Spark 3.5 needs Java 8, 11 or 17, found '$jline': install openjdk-17-jre-headless and set JAVA_HOME" ;;
esac

# --- the virtualenv ------------------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24" "setuptools>=77" wheel

# torch first and alone: pinned to the CPU build so that nothing later pulls a multi-GB CUDA build.
"${PIP[@]}" install -q -c constraints.txt "torch==2.13.0"
# Everything with sound metadata, at the locked versions (pyspark builds from a large sdist the first time).
"${PIP[@]}" install -q -c constraints.txt -e ".[dev]" cmake
# Petastorm 0.13.1 pins setuptools<70 (torch needs >=77) but runs fine: install it alone; its real needs
# are listed in pyproject.toml.
"${PIP[@]}" install -q -c constraints.txt --no-deps "petastorm==0.13.1"
# Horovod: built once from its sdist as C++17 (see tools/build_horovod.sh), then installed from the cache.
wheel=$(bash tools/build_horovod.sh "$PY" "$CACHE")
"${PIP[@]}" install -q --no-deps "$wheel"

# Real S3 (SeaweedFS) and HDFS (Hadoop 2.7.3) servers for the tests, and the s3a jars: into $CACHE/servers,
# never into the venv (tools/provision_servers.sh; about 30 s and 360 MB the first time).
bash tools/provision_servers.sh "$CACHE" "$PY"

# --- smoke check: the stack imports together -------------------------------------------------------------
"$PY" - <<'PYEOF'
import horovod, horovod.torch as hvd, mlflow, numpy, petastorm, pyarrow, pyspark, torch
assert pyarrow.__version__ == "14.0.2", pyarrow.__version__
assert numpy.__version__.startswith("1.26"), numpy.__version__
assert hvd.gloo_built(), "horovod was built without Gloo"
print(f"dlpipe setup: ok (pyspark {pyspark.__version__}, torch {torch.__version__}, horovod {horovod.__version__}, "
      f"petastorm {petastorm.__version__}, mlflow {mlflow.__version__}, pyarrow {pyarrow.__version__})")
PYEOF
