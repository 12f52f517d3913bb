#!/usr/bin/env bash
# Install everything, then run the fast test suite (slow tests: python -m pytest -m slow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
