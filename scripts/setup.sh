#!/usr/bin/env bash
# Creates .venv (if missing) and installs sdtorch with its test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
# Chromium for the web page's browser tests (tests/test_web_page.py): Debian's packages, when missing and
# apt-get is there. Playwright drives it and never downloads a browser. Never fails the setup.
if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$sudo" ] || command -v sudo >/dev/null 2>&1; }; then
    log="$(mktemp)"
    if ! { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >"$log" 2>&1; then
      echo "setup: could not install chromium (apt-get failed, log: $log); the browser tests will fail until" \
           "'apt-get install chromium chromium-driver' succeeds" >&2
    else
      rm -f "$log"
    fi
  else
    echo "setup: chromium is missing and cannot be installed here (needs apt-get as root);" \
         "the browser tests (tests/test_web_page.py) will fail until it is installed" >&2
  fi
fi
