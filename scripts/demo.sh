#!/usr/bin/env bash
# README command 1: install what is needed, then run the main job on its built-in default (no download):
# python -m lit_peft fit --config demo.yaml (extra arguments go to the CLI, e.g. --trainer.max_epochs=4).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m lit_peft fit --config demo.yaml "$@"
