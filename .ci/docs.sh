#!/usr/bin/env bash
# Build the documentation (Sphinx + MyST) with warnings as errors, in the venv that is
# already active (the CI venv made by .ci/run): install the `docs` extra, then build.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
    echo "docs.sh: activate the CI venv first (it installs into the active venv)" >&2
    exit 1
fi
python -m pip install --quiet -e ".[docs]"
rm -rf docs/_build
python -m sphinx -W --keep-going -b html docs docs/_build/html
echo "docs built: docs/_build/html/index.html"
