#!/usr/bin/env bash
# Creates .venv (if missing) and installs sdtorch with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
