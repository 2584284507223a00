#!/usr/bin/env bash
# lrcomp's test command: three lanes, all on the CPU.
#   1. default lane: the whole suite on the reference backend (kernel tests skip);
#   2. Triton-interpreter lane: the kernel tests with TRITON_INTERPRET=1;
#   3. ruff.
# Uses the venv at ${LRCOMP_VENV:-.venv} when it exists, else the python on PATH.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${LRCOMP_VENV:-.venv}
if [ -x "$venv/bin/python" ]; then export PATH="$(cd "$venv" && pwd)/bin:$PATH"; fi  # relative or absolute
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

status=0
echo "== lane 1: reference backend =="
LRCOMP_BACKEND=torch pytest -q -p no:cacheprovider tests || status=1
echo "== lane 2: Triton kernels under the interpreter =="
TRITON_INTERPRET=1 pytest -q -p no:cacheprovider -m kernels tests/kernels || status=1
echo "== lane 3: ruff =="
ruff check . && echo "ruff: clean" || status=1
exit $status
