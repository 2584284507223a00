#!/usr/bin/env bash
# Set up a fresh machine for lrcomp: a venv at ${LRCOMP_VENV:-.venv} with the CPU build of
# torch 2.13.0, triton, and lrcomp with its test extras (editable); Debian's `fortunes`
# (real labelled text for the main job) when apt is available and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LRCOMP_VENV:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
# Pinned first, on its own: an unpinned torch would pull several GB of CUDA packages.
"$venv/bin/python" -m pip install -q "torch==2.13.0"
"$venv/bin/python" -m pip install -q -e ".[test]"

if [ ! -d /usr/share/games/fortunes ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes) >/dev/null \
      || echo "setup_env: could not install Debian's fortunes; the main job needs --data" >&2
  else
    echo "setup_env: Debian's fortunes is missing (apt-get install fortunes); the main job needs it or --data" >&2
  fi
fi
echo "setup_env: ready ($("$venv/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'))"
