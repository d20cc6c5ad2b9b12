#!/usr/bin/env bash
# Install Debian's headless-capable Chromium for the UI's browser test (tests/test_ui_browser.py).
# Idempotent and quiet: does nothing when /usr/bin/chromium is already there. Never downloads
# a browser through playwright; the test drives this system binary.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
/usr/bin/chromium --version
