#!/usr/bin/env bash
# Build a throw-away virtual environment with the *reference* LeGrad implementation
# (legrad-torch 1.1 by WalBouss, which pins open-clip-torch<=2.23).
#
# Usage: scripts/reference_env.sh [VENV_DIR]     (default: /tmp/legrad-ref-venv)
#
# This venv is only used to (re)generate tests/fixtures/reference/ with
# scripts/make_golden_fixtures.py, to run scripts/reference_defects.py and for the
# legrad-torch rows of benchmarks/bench_cpu.py (--reference-python VENV_DIR/bin/python).
# The project itself and its tests never import legrad or open_clip 2.23.
set -euo pipefail

VENV_DIR="${1:-/tmp/legrad-ref-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"

export HF_HUB_OFFLINE=1

if [ ! -x "$VENV_DIR/bin/python" ]; then
    "$PYTHON" -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip install --disable-pip-version-check)

"${PIP[@]}" --upgrade pip setuptools wheel >/dev/null

# torch first, so that nothing below pulls in a different build.
if ! "${PIP[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC"; then
    echo "reference_env.sh: torch+torchvision failed together; trying torch alone" >&2
    "${PIP[@]}" "$TORCH_SPEC"
fi

# The reference package and the open_clip release it was written against.
# Keep torch pinned while resolving so pip cannot up/downgrade it.
"${PIP[@]}" "$TORCH_SPEC" \
    "legrad-torch==1.1" "open-clip-torch==2.23.0" safetensors numpy

# Captum, so that benchmarks/bench_cpu.py can time captum_legrad (imported from this
# checkout) against the reference in the same process, on the same open_clip 2.23 model.
"${PIP[@]}" "$TORCH_SPEC" "captum==0.9.0"

"$VENV_DIR/bin/python" - <<'PY'
import importlib.metadata as md
for name in ("torch", "torchvision", "open_clip_torch", "legrad-torch", "timm", "safetensors", "numpy", "captum"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
import captum, legrad, open_clip  # noqa: F401  (import check)
print("reference venv OK:", legrad.__file__)
PY
