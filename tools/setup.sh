#!/usr/bin/env bash
# Build a working environment from nothing: .venv (or the active python),
# registry torch + matching torchvision, detectron2, randwire_d2 (editable, with
# test extras). Idempotent: steps already done are skipped, and a run with
# nothing to do returns in seconds.
#
#   bash tools/setup.sh            # use/create ./.venv
#   bash tools/setup.sh --system   # use the active python3 (or RANDWIRE_USE_ACTIVE_PYTHON=1)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
USE_ACTIVE=${RANDWIRE_USE_ACTIVE_PYTHON:-0}

for arg in "$@"; do
    case $arg in
        --system) USE_ACTIVE=1 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown argument $arg" >&2; exit 2 ;;
    esac
done

log() { echo "[setup] $*"; }

# --- interpreter -------------------------------------------------------------
if [[ $USE_ACTIVE == 1 ]]; then
    PY=$(command -v python3 || command -v python)
    STAMP_DIR=$ROOT/.cache
else
    if [[ ! -x .venv/bin/python ]]; then
        log "creating .venv with $(python3 --version)"
        python3 -m venv .venv
    fi
    PY=$ROOT/.venv/bin/python
    STAMP_DIR=$ROOT/.venv
fi
log "python: $PY ($("$PY" --version 2>&1))"

# The stamp records a completed run for these inputs; editing them re-runs setup.
inputs_hash() {
    "$PY" - "$PY" setup.py tools/install_detectron2.py tools/setup.sh <<'EOF'
import hashlib, sys
h = hashlib.sha256(sys.argv[1].encode())
for path in sys.argv[2:]:
    h.update(open(path, "rb").read())
print(h.hexdigest())
EOF
}
STAMP=$STAMP_DIR/.randwire_setup_stamp
HASH=$(inputs_hash)

# Registry torch with CUDA libraries: the CPU-only 2.13.0+cpu wheel some
# machines carry breaks torchvision's compiled ops (see README).
torch_ok() {
    "$PY" - <<'EOF' 2>/dev/null
import torch, torchvision
from torchvision.ops import nms
assert "+cpu" not in torch.__version__, torch.__version__
nms(torch.zeros(1, 4), torch.ones(1), 0.5)
EOF
}

# Cheap check for the no-op path (importing torch takes seconds): the stamp
# proves a full run passed; this proves nothing was uninstalled since.
quick_ok() {
    "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util
assert "+cpu" not in md.version("torch")
md.version("torchvision"); md.version("randwire_d2")
assert importlib.util.find_spec("detectron2") and importlib.util.find_spec("randwire_d2")
EOF
}

if [[ -f $STAMP && $(cat "$STAMP") == "$HASH" ]] && quick_ok; then
    log "environment up to date, nothing to do"
    exit 0
fi
rm -f "$STAMP"

# --- build tools ---------------------------------------------------------------
# setuptools is needed for --no-build-isolation builds (detectron2's setup.py imports torch).
if "$PY" -c "import setuptools" 2>/dev/null; then
    log "setuptools: present"
else
    log "setuptools: installing"
    "$PY" -m pip install -q setuptools wheel
fi

# --- torch + torchvision -------------------------------------------------------
if torch_ok; then
    log "torch: keeping $("$PY" -c 'import torch, torchvision; print(torch.__version__, "+ torchvision", torchvision.__version__)')"
else
    log "torch: installing registry torch + matching torchvision (large download)"
    # Point find-links at an empty dir: it overrides a configured find-links
    # that may hold the CPU-only torch wheel.
    EMPTY_LINKS=$(mktemp -d)
    PIP_FIND_LINKS=$EMPTY_LINKS "$PY" -m pip install --upgrade --upgrade-strategy only-if-needed torch torchvision
    rmdir "$EMPTY_LINKS"
    if ! torch_ok; then
        echo "setup.sh: torch/torchvision still unusable after install (CPU-only torch wheel?)." >&2
        "$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" >&2 || true
        exit 1
    fi
    log "torch: installed $("$PY" -c 'import torch; print(torch.__version__)')"
fi

# --- detectron2 ----------------------------------------------------------------
log "detectron2: tools/install_detectron2.py"
"$PY" tools/install_detectron2.py

# --- randwire_d2 ---------------------------------------------------------------
log "randwire_d2: pip install -e .[test]"
"$PY" -m pip install -q --no-build-isolation -e ".[test]"

# --- test data -------------------------------------------------------------------
# Real images for the classification tests: foolbox ships 20 ImageNet val JPEGs
# (read as files; foolbox itself is never imported, hence --no-deps), and Debian
# packages Fashion-MNIST.
if ! "$PY" -c "import importlib.util as u; assert u.find_spec('foolbox')" 2>/dev/null; then
    log "test data: foolbox==3.3.4 (--no-deps, for its ImageNet sample JPEGs)"
    "$PY" -m pip install -q --no-deps foolbox==3.3.4
fi
if [[ ! -d /usr/share/datasets/fashion-mnist ]]; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "test data: apt-get install dataset-fashion-mnist"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
    else
        log "test data: Fashion-MNIST missing; its tests skip (as root: apt-get install dataset-fashion-mnist)"
    fi
fi

mkdir -p "$STAMP_DIR"
echo "$HASH" > "$STAMP"
log "done"
