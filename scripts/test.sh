#!/usr/bin/env bash
# Install everything, then run the fast test suite (slow tests: python -m pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
# The web app's browser tests drive the system's Chromium and its driver (Debian packages:
# nothing downloads a browser); CI runs as root on Debian and installs them when missing.
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    else
        echo "note: no chromium / chromedriver (apt-get install chromium chromium-driver): browser tests skip" >&2
    fi
fi
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
