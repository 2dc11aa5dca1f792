#!/usr/bin/env bash
# The timeline's browser test (tests/e2e/test_timeline_browser.py) needs headless Chromium:
# Debian's `chromium` package. Install it when we can (root with apt-get); otherwise say why the
# test will be skipped. `--require` (used by .ci/run) makes a missing browser an error.
set -uo pipefail
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the timeline's browser test (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if apt-get install -y -q chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; then
    exit 0
  fi
  why="apt-get install -y chromium failed"
else
  why="not root with apt-get here: install Debian's chromium package (apt-get install -y chromium)"
fi
if [ "${1:-}" = "--require" ]; then
  echo "no Chromium, and it could not be installed ($why): the timeline's browser test cannot run" >&2
  exit 1
fi
echo "no Chromium ($why): the timeline's browser test will be skipped"
exit 0
