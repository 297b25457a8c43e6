#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the demo's browser test when they are missing
# (idempotent, non-interactive; nothing downloads a browser build of its own).
# Usage: .ci/setup_browser.sh   (as root, or with passwordless sudo)
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "setup_browser: chromium and chromium-driver already installed"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "setup_browser: need root or sudo" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup_browser: installing chromium chromium-driver"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "setup_browser: installed $(chromedriver --version)"
