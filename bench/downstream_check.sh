#!/usr/bin/env bash
# The demo folders in the tools users take them to next (lm-eval, ONNX, GGUF, CTranslate2, peft,
# transformers 4): one pinned virtual environment per client, one table. Not in CI.
#   bash bench/downstream_check.sh [--clients onnx,gguf] [--reuse]
set -euo pipefail
cd "$(dirname "$0")/.."
make setup tokenizer >/dev/null
exec .venv/bin/python bench/downstream_check.py "$@"
