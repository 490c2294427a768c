#!/usr/bin/env bash
# Captum Insights tests (tests/insights) in a venv of their own: Insights exists only in
# captum 0.8.0, which needs numpy<2, while the main suite runs captum 0.9 with numpy 2.
# The browser test drives Debian's Chromium (installed here if missing) with Playwright.
# Exits non-zero on any failure, including pytest's exit code 5 ("no tests collected").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${INSIGHTS_VENV:-.ci/venv-insights}"

if [ ! -x /usr/bin/chromium ]; then
    echo "== installing chromium (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== venv $VENV"
python3 -m venv --clear "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# torch and torchvision come from local disk here (pip's find-links); one resolver run.
python -m pip install --quiet \
    "torch==2.14.1" "torchvision==0.29.1" \
    "captum==0.8.0" "numpy<2" flask flask-compress ipywidgets \
    timm playwright pytest
python -m pip install --quiet --no-deps -e .
export HF_HUB_OFFLINE=1

python - <<'PY'
import captum, numpy
import captum.insights  # noqa: F401  (fails here, not in every test, if Insights is missing)
print("captum", captum.__version__, "numpy", numpy.__version__)
PY

echo "== pytest tests/insights"
set +e
python -m pytest tests/insights -q
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no Insights tests: failing" >&2
    exit 1
fi
exit "$status"
