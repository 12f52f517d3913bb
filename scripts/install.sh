#!/usr/bin/env bash
# Install iclora and its requirements into the current Python environment.
# torch is pinned first: a bare `torch` requirement would pull the newest build with
# several GB of CUDA wheels; requirements.txt keeps a range that 2.13.0 satisfies.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -r requirements.txt
# The package itself (editable: `iclora` maps to src/) and its `iclora` command.
python -m pip install --quiet --disable-pip-version-check --no-deps -e .
