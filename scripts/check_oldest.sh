#!/usr/bin/env bash
# Run the model-family tests on the OLDEST model-library releases that pyproject.toml allows
# (timm>=0.9.16, transformers>=4.40, open-clip-torch>=2.20), in a venv of their own.
#
# Usage: bash scripts/check_oldest.sh [VENV_DIR] [-- extra pytest arguments]
#   VENV_DIR     default $OLDEST_VENV or /work/venv-oldest; reused when VENV_DIR/.ready exists
#                (delete the folder, or set OLDEST_REBUILD=1, to build it anew)
#   OUT_DIR      where the summary and the pytest logs go (default build/check_oldest)
#   PYTHON       the interpreter the venv is made from (default python3.11)
#
# The venv gets torch 2.14.1 / torchvision 0.29.1, timm 0.9.16, transformers 4.40.0 (the
# lowest 4.40.x; the next ones are tried if it does not install), open-clip-torch 2.20.0,
# captum from the pyproject range, and the test tools of the `test` extra without gradio and
# playwright (the explorer's tests are not run here), then this checkout with --no-deps.
# No weights are downloaded: HF_HUB_OFFLINE=1, the tests build tiny random-init models.
#
# Exit status: 0 when no test failed (skips are expected: docs/versions.md lists them),
# 1 otherwise. docs/versions.md records the counts of the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

VENV="${OLDEST_VENV:-/work/venv-oldest}"
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    VENV="$1"
    shift
fi
[ "${1:-}" = "--" ] && shift
PYTHON="${PYTHON:-python3.11}"
OUT_DIR="${OUT_DIR:-$REPO/build/check_oldest}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"
TIMM_SPEC="timm==0.9.16"
OPEN_CLIP_SPEC="open-clip-torch==2.20.0"
TRANSFORMERS_CANDIDATES="${TRANSFORMERS_CANDIDATES:-4.40.0 4.40.1 4.40.2}"
# transformers 4.40 and open_clip 2.20 predate numpy 2 (June 2024) but run with it (the
# tests pass with numpy 2.x); NUMPY_SPEC="numpy<2" builds the venv with numpy 1.x instead.
NUMPY_SPEC="${NUMPY_SPEC:-numpy}"
CAPTUM_SPEC="captum>=0.7"
TEST_TOOLS=(
    "safetensors>=0.4" "matplotlib>=3.5" "pillow>=9" "h5py>=3.8" "tqdm>=4.60"
    "pytest>=7" "hypothesis>=6"
)

# The test files that build models of the families (timm, HF transformers, open_clip,
# torchvision) or run every family through one path.
FAMILY_TESTS=(
    tests/test_oracle.py tests/test_timm_families.py tests/test_naflex.py
    tests/test_hf.py tests/test_hf_families.py tests/test_vlm.py
    tests/test_open_clip.py tests/test_open_clip_configs.py tests/test_torchvision.py
    tests/test_routes.py tests/test_side_effects.py tests/test_properties.py
    tests/test_concurrency.py tests/test_resize.py tests/test_custom_spec.py
    tests/test_errors.py tests/test_capture_and_spec.py tests/test_api.py
    tests/test_baselines.py tests/test_reference_2x.py tests/test_chunking_precision.py
    tests/test_cli.py tests/test_cli_files.py tests/test_versions.py
)

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "${OLDEST_REBUILD:-0}" = "1" ]; then
    rm -rf "$VENV"
fi
mkdir -p "$OUT_DIR"
if [ ! -f "$VENV/.ready" ]; then
    echo "== building $VENV from $PYTHON"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet)
    "${PIP[@]}" --upgrade pip setuptools wheel
    # torch first (from local disk on this machine), then everything with torch pinned so
    # that no resolution below can replace it.
    "${PIP[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC"
    installed=""
    for version in $TRANSFORMERS_CANDIDATES; do
        if "${PIP[@]}" "$TORCH_SPEC" "$TORCHVISION_SPEC" "$NUMPY_SPEC" \
            "$TIMM_SPEC" "transformers==$version" "$OPEN_CLIP_SPEC" "$CAPTUM_SPEC" \
            "${TEST_TOOLS[@]}"; then
            installed="$version"
            break
        fi
        echo "transformers==$version did not install; trying the next 4.40.x" >&2
    done
    if [ -z "$installed" ]; then
        echo "check_oldest.sh: no transformers 4.40.x installed ($TRANSFORMERS_CANDIDATES)" >&2
        exit 2
    fi
    # setuptools' editable build is chatty: its log goes with the results.
    "${PIP[@]}" --no-deps -e "$REPO" >"$OUT_DIR/install.log" 2>&1 || {
        cat "$OUT_DIR/install.log" >&2
        exit 2
    }
    touch "$VENV/.ready"
fi

SUMMARY="$OUT_DIR/summary.txt"
{
    echo "# check_oldest.sh $(date -u '+%Y-%m-%d %H:%M UTC')"
    "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import sys
print("python", sys.version.split()[0])
for name in ("torch", "torchvision", "timm", "transformers", "open_clip_torch", "captum",
             "numpy", "huggingface_hub", "tokenizers", "safetensors"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
PY
} >"$SUMMARY"

# The checkout, not whatever an editable install elsewhere points at.
export PYTHONPATH="$REPO"
status=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfEs \
    --junitxml="$OUT_DIR/junit.xml" "${FAMILY_TESTS[@]}" "$@" \
    >"$OUT_DIR/pytest.log" 2>&1 || status=$?

"$VENV/bin/python" - "$OUT_DIR/junit.xml" >>"$SUMMARY" <<'PY'
import collections
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
per_file = collections.defaultdict(collections.Counter)
reasons = collections.Counter()
for case in root.iter("testcase"):
    name = case.get("classname", "").split(".")
    module = ".".join(name[:2]) if len(name) > 1 else name[0]
    if case.find("failure") is not None or case.find("error") is not None:
        outcome = "failed"
    elif case.find("skipped") is not None:
        outcome = "skipped"
        reasons[case.find("skipped").get("message", "")] += 1
    else:
        outcome = "passed"
    per_file[module][outcome] += 1
total = collections.Counter()
print()
print(f"{'test module':32} {'passed':>7} {'skipped':>8} {'failed':>7}")
for module in sorted(per_file):
    c = per_file[module]
    total.update(c)
    print(f"{module:32} {c['passed']:7} {c['skipped']:8} {c['failed']:7}")
print(f"{'total':32} {total['passed']:7} {total['skipped']:8} {total['failed']:7}")
print()
print("skip reasons (count):")
for reason, count in reasons.most_common():
    print(f"  {count:4}  {reason}")
PY
tail -n 3 "$OUT_DIR/pytest.log" >>"$SUMMARY"
cat "$SUMMARY"
echo "full log: $OUT_DIR/pytest.log"
if [ "$status" -eq 0 ]; then
    exit 0
fi
exit 1
