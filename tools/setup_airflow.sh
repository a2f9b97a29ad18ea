#!/usr/bin/env bash
# Creates .venv-airflow: Apache Airflow 3.3.2 and its Spark provider, apart from .venv so that Airflow's
# dependencies never touch the pinned Spark/PyTorch stack. The DAG (pipelines/airflow_dag.py) needs no dlpipe,
# pyspark or torch here: its tasks call .venv/bin/spark-submit.
#
#   bash tools/setup_airflow.sh          install at the versions locked in airflow-constraints.txt
#   bash tools/setup_airflow.sh --lock   install the newest that fit, then rewrite airflow-constraints.txt
#
# Airflow documents installing against its published constraints file, which lies outside the package
# registries this project may reach; airflow-constraints.txt plays that role (a pip freeze of a working
# install). AIRFLOW_CONSTRAINTS=<path or URL> uses another one, e.g. Airflow's own constraints-3.11.txt.
# A second run with the same script and lock does nothing (stamp file in the venv); re-running is always safe.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=${AIRFLOW_VENV:-.venv-airflow}
CONSTRAINTS=${AIRFLOW_CONSTRAINTS:-airflow-constraints.txt}
AIRFLOW_VERSION=3.3.2
SPARK_PROVIDER_VERSION=6.3.4
STAMP="$VENV/.dlpipe-airflow-setup"
LOCK=0
[ "${1:-}" = "--lock" ] && LOCK=1

die() { echo "dlpipe airflow setup: $*" >&2; exit 1; }

# The stamp holds a hash of what decides the install: this script and the lock.
key=$({ cat "$0"; if [ -f "$CONSTRAINTS" ]; then cat "$CONSTRAINTS"; else echo "$CONSTRAINTS"; fi; } | sha256sum | cut -d' ' -f1)
if [ "$LOCK" = 0 ] && [ -x "$VENV/bin/airflow" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$key" ]; then
    echo "dlpipe airflow setup: $VENV is up to date"
    exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 \
    || die "Python 3.11 not found as '$PYTHON': install Python 3.11 or run with PYTHON=/path/to/python3.11"
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "'$PYTHON' does not run: install Python 3.11 or run with PYTHON=/path/to/python3.11"
[ "$pyver" = "3.11" ] || die "Python 3.11 is required (the lock is for 3.11), but '$PYTHON' is Python $pyver"
if [ "$LOCK" = 0 ] && [ ! -f "$CONSTRAINTS" ] && [[ "$CONSTRAINTS" != *://* ]]; then
    die "no $CONSTRAINTS: restore it from git, or make one with 'bash tools/setup_airflow.sh --lock'"
fi

rm -f "$STAMP"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
printf '*\n' > "$VENV/.gitignore"  # keeps the venv out of git whatever the project's .gitignore says
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade "pip>=24"

pins=()
[ "$LOCK" = 0 ] && pins=(-c "$CONSTRAINTS")
# The Spark provider's metadata pulls pyspark-client, which would put a second, newer pyspark (and pyarrow)
# here: install it alone, with the two requirements it really uses (stack-facts.md, Airflow 3.3.2).
"${PIP[@]}" install -q "${pins[@]}" "apache-airflow==$AIRFLOW_VERSION" grpcio-status tenacity
"${PIP[@]}" install -q "${pins[@]}" --no-deps "apache-airflow-providers-apache-spark==$SPARK_PROVIDER_VERSION"

# Smoke check in a throwaway AIRFLOW_HOME (Airflow writes airflow.cfg where it starts).
home=$(mktemp -d)
trap 'rm -rf "$home"' EXIT
AIRFLOW_HOME="$home" "$VENV/bin/python" - <<'PYEOF'
import airflow
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator  # noqa: F401
from airflow.providers.standard.operators.bash import BashOperator  # noqa: F401

print(f"dlpipe airflow setup: ok (apache-airflow {airflow.__version__})")
PYEOF

if [ "$LOCK" = 1 ]; then
    {
        echo "# The lock for .venv-airflow (Python 3.11): a pip freeze of a working install; regenerate with"
        echo "# 'bash tools/setup_airflow.sh --lock'. The Spark provider is installed --no-deps (tools/setup_airflow.sh)."
        "$VENV/bin/python" -m pip freeze | grep -v '^#' | sort -f
    } > "$CONSTRAINTS"
    echo "dlpipe airflow setup: wrote $CONSTRAINTS"
    key=$({ cat "$0"; cat "$CONSTRAINTS"; } | sha256sum | cut -d' ' -f1)
fi
echo "$key" > "$STAMP"
