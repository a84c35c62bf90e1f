#!/usr/bin/env bash
# Create .venv (if needed) and install rawrestore with its test extras. Idempotent and offline-safe:
# torch and torchvision come from the pinned wheels pip can reach; nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -vE "is ignored: it is neither|^$" || true; }
if ! python -c "import torch, torchvision" >/dev/null 2>&1; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
    *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  esac
  echo "setup: installing $TORCH (about a minute)"
  pip install -q $TORCH 2>&1 | quiet
fi
if ! python -c "import rawrestore, isp, rawpy, pidng, lpips, pytest, png" >/dev/null 2>&1 || [ pyproject.toml -nt .venv/.rawrestore-installed ]; then
  echo "setup: installing rawrestore and its dependencies"
  pip install -q -e ".[test]" 2>&1 | quiet
  touch .venv/.rawrestore-installed
fi
