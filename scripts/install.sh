#!/usr/bin/env bash
# Install lit_peft (editable) with its test extras on a fresh machine; quick when everything is there already.
# torch/torchvision are pinned to a matching pair known to install and import on the CPU development machines
# (docs/platform-notes.md, Installing); set TORCH_SPEC to override, e.g. TORCH_SPEC="torch torchvision" on a machine
# that has its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    "$PY" -m pip install --quiet $TORCH_SPEC
fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test,assets]"
