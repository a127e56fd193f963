#!/usr/bin/env bash
# Set up everything fastsparse's demo, tests and docs need, into a virtual environment.
# Usage: tools/install.sh [python] [venv-dir]
set -euo pipefail
PY=${1:-python3}; VENV=${2:-.venv}
cd "$(dirname "$0")/.."

# Headless Chromium and its driver for the docs browser test (Debian packages).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Installing chromium and chromium-driver (for the docs browser test)..."
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "NOTE: chromium/chromedriver not found and cannot apt-get them: the docs browser test will be skipped." >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pipi() {  # pip install, quiet on success, full log on failure (minus this machine's index-path noise)
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$@" >"$log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$log" >&2; exit 1
  fi
  grep -v "is ignored: it is neither a file nor a directory" "$log" || true
}
# torch 2.14.1 + torchvision 0.29.1 run fastai (and fastai.vision for the tutorials) on the CPU.
# The library itself never imports torchvision.
pipi "torch==2.14.1" "torchvision==0.29.1"
pipi -e ".[dev,bench]"  # bench: fasterai 0.4.1, compared with in bench/ and tests/test_vs_fasterai.py
"$VENV/bin/python" -c "import torch, fastai, fastsparse; print('fastsparse', fastsparse.__version__, '| torch', torch.__version__, '| fastai', fastai.__version__)"
