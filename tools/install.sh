#!/usr/bin/env bash
# Make .venv and install precisebn into it with the extras given (default: test).
# The venv sees the system's packages, so an installed torch >= 2.6 is reused; otherwise
# torch 2.13.0 is installed by exact version (a bare `pip install torch` can pull a
# multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv --system-site-packages .venv
if ! .venv/bin/python -c '
import torch
raise SystemExit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 6))' 2>/dev/null; then
    .venv/bin/pip install -q 'torch==2.13.0'
fi
.venv/bin/pip install -q -e ".[$extras]"
