#!/usr/bin/env bash
# Regenerates constraints.txt (the full lock) from the working .venv after a deliberate upgrade.
set -euo pipefail
cd "$(dirname "$0")/.."
{
    echo "# The lock for the whole dlpipe stack (pip freeze of a working .venv; regenerate with tools/lock.sh)."
    echo "# torch is the CPU build: pip takes torch==2.13.0 from the machine's wheel cache or PyTorch's CPU index."
    .venv/bin/python -m pip freeze --exclude-editable \
        | grep -v -e '^dlpipe' -e '^#' \
        | sed -E -e 's/^torch==([0-9.]+)\+cpu$/torch==\1/' -e 's/^horovod @ .*/horovod==0.28.1/' \
        | sort -f
} > constraints.txt
