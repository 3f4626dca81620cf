#!/usr/bin/env bash
# Create or update .venv/ at the repo root. Idempotent: a second run with nothing changed takes seconds.
#   torch first (torch==2.13.0, CPU build from local disk, unless the venv already has torch >= 2.2),
#   then the package with its dependencies and test tools, then the dgl graphbolt placeholder (.pth).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="${PYTHON:-python3}"
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
vpy="$venv/bin/python"
stamp="$venv/.lgmrec_setup_stamp"
want="$(cat pyproject.toml launch/setup.sh lgmrec_dist/_dgl_shim.py | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$vpy" -c "import lgmrec_dist, dgl" 2>/dev/null; then
    echo "setup: .venv is up to date"
    exit 0
fi
pip() { "$vpy" -m pip --disable-pip-version-check -q "$@"; }
if ! "$vpy" - <<'PY' 2>/dev/null
import sys, torch
major, minor = (int(x) for x in torch.__version__.split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 2) else 1)
PY
then
    echo "setup: installing torch==2.13.0 (CPU)"
    pip install "torch==2.13.0"
else
    echo "setup: keeping torch $("$vpy" -c 'import torch; print(torch.__version__)')"
fi
echo "setup: installing lgmrec_dist and its dependencies (extras: test, text, image, serve, ann)"
pip install -e ".[test,text,image,serve,ann]"
site="$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp lgmrec_dist/_dgl_shim.py "$site/lgmrec_dgl_shim.py"
echo "import lgmrec_dgl_shim" > "$site/lgmrec_dgl_shim.pth"
"$vpy" -c "import dgl, torch, ray, pyarrow; print(f'setup: torch {torch.__version__}, dgl {dgl.__version__}, ray {ray.__version__}, pyarrow {pyarrow.__version__}')"
echo "$want" > "$stamp"
