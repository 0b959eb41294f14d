#!/usr/bin/env bash
# Create one virtual environment per reference model scanner for bench/validator_bench.py's
# `scan` part, each with pinned versions and nothing of the project's own venv, so their
# dependencies (numpy<2 for modelscan, ModelAudit's own pins) cannot clash with ours.
#
#   bash bench/scanner_venvs.sh [DIR]            # default DIR: .cache/scanners (git-ignored)
#   .venv/bin/python bench/validator_bench.py --only scan \
#       --modelscan DIR/modelscan/bin/modelscan \
#       --modelaudit DIR/modelaudit/bin/modelaudit \
#       --fickling DIR/fickling/bin/fickling
#
# Versions: the newest on PyPI when the bench was last run (see FIELD-NOTES). picklescan runs
# from the project venv (a dev dependency: the reference the tests compare against). Re-running is cheap: a venv whose
# pinned version is already installed is left alone.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$REPO/.cache/scanners}"
PYTHON="${PYTHON:-python3}"
MODELSCAN_VERSION="0.8.8"
MODELAUDIT_VERSION="0.2.54"
FICKLING_VERSION="0.1.12"

make_venv() {  # name, distribution, requirements...
  local name="$1" dist="$2"
  shift 2
  local venv="$DIR/$name"
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -m pip show -q "$dist" >/dev/null 2>&1 &&
    "$venv/bin/python" - "$dist" "$@" <<'EOF'
import sys
from importlib.metadata import version
dist, spec = sys.argv[1], sys.argv[2]
sys.exit(0 if spec.endswith("==" + version(dist)) else 1)
EOF
  then
    echo "$name: $venv already has $*"
    return
  fi
  echo "$name: creating $venv with $*"
  "$PYTHON" -m venv --clear "$venv"
  "$venv/bin/python" -m pip install -q "$@"
  echo "$name: $dist $("$venv/bin/python" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$dist")"
}

mkdir -p "$DIR"
# modelscan reads .npy only with numpy<2, and .h5 only with its h5py extra; its Keras and
# SavedModel scanners want tensorflow, which is left out (its column says what it skipped).
make_venv modelscan modelscan "modelscan[h5py]==$MODELSCAN_VERSION" "numpy<2"
# ModelAudit with the extras of the formats the fixtures use (h5py, onnx, torch, safetensors):
# without torch it warns on every torch global it cannot prove inert. torch is pinned like the
# project's, or pip picks a multi-GB CUDA build.
make_venv modelaudit modelaudit "modelaudit[h5,onnx,pytorch,safetensors]==$MODELAUDIT_VERSION" \
  "torch==2.13.0"
# fickling 0.1.12 imports typing_extensions on Python < 3.12 without declaring it.
make_venv fickling fickling "fickling==$FICKLING_VERSION" typing_extensions

echo
echo "--modelscan $DIR/modelscan/bin/modelscan"
echo "--modelaudit $DIR/modelaudit/bin/modelaudit"
echo "--fickling $DIR/fickling/bin/fickling"
