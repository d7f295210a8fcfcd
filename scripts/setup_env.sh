#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs dynexit with the given extras.
# Idempotent: a stamp keyed by pyproject.toml and the extras skips the install when nothing changed.
# Usage: scripts/setup_env.sh VENV_DIR EXTRAS   (e.g. .venv dev,notebooks)
set -euo pipefail
venv=${1:-.venv}
extras=${2:-dev}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv" 2>/dev/null; then
        echo "python3 -m venv failed; on Debian/Ubuntu install it with: apt-get install python3-venv" >&2
        exit 1
    fi
fi
stamp="$venv/.dynexit-installed"
want="$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "environment $venv is up to date"
    exit 0
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[$extras]"
echo "$want" > "$stamp"
