#!/usr/bin/env bash
# Create a virtualenv with liveserve and its test extras. torch is installed as the pinned CPU build
# (2.13.0) unless the environment already has a torch: a bare "torch" requirement would otherwise pull
# several GB of CUDA packages.
set -euo pipefail
venv="${1:-.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "install: creating $venv" >&2
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "install: torch==2.13.0" >&2
  "$venv/bin/python" -m pip install -q "torch==2.13.0"
fi
echo "install: liveserve[test]" >&2
"$venv/bin/python" -m pip install -q -e ".[test]"
echo "install: gRPC stubs from protos/" >&2
"$venv/bin/python" scripts/gen_protos.py 2>/dev/null

# --- Browser front test: Debian's headless Chromium (tests/test_web.py drives the page in it) ----------
# Installed only where it is missing, on Debian (or a derivative), as root; elsewhere the browser test
# skips locally and fails under CI=true. LIVESERVE_SKIP_CHROMIUM=1 leaves it out.
if [ -z "${LIVESERVE_SKIP_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1 \
    && [ -f /etc/debian_version ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install: chromium (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
