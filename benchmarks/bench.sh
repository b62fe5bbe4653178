#!/usr/bin/env bash
# The benchmark in one command on a fresh machine: a venv with the gateway and the benchmark's
# extras, then the run. nginx is measured when installed (apt-get install nginx), else skipped.
# Arguments go to run.py, e.g. `bash benchmarks/bench.sh --quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[speed]' \
    -r benchmarks/requirements.txt
exec .venv/bin/python benchmarks/run.py "$@"
