#!/usr/bin/env bash
# README command 2: install what the tests need, then run them (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The real model and data of tests/test_real_models.py (cached under ~/.cache/lit_peft/assets: quick once prepared).
# Without them that test skips, and under CI fails, naming what is missing.
"${PYTHON:-python3}" -m lit_peft.assets prepare smollm2-135m-instruct rt-sentiment \
    || echo "scripts/test.sh: could not prepare the real-model assets; tests/test_real_models.py will say why" >&2
exec "${PYTHON:-python3}" -m pytest -q "$@"
