#!/usr/bin/env bash
# The GPU figures of issue 14 in one run: JSON + markdown table in $OUT (or ./gpu_bench_out).
#
#   scripts/gpu_bench.sh                 # on a machine with a CUDA GPU (e.g. the lent device)
#   scripts/gpu_bench.sh --dry           # on the CPU, tiny sizes: checks the script end to end
#   scripts/gpu_bench.sh --fetch-wheels  # HERE (with PyPI access): save the wheels the device lacks
#                                        # into .whl/ (git-ignored); the device tool then needs
#                                        # carry: [".whl"] (about 2 MB)
# Any other arguments go to `python -m hqsmem_ros.tools.gpu_bench` (see its --help), e.g.
#   scripts/gpu_bench.sh --stages dino,sam2 --sam2-frames 5000
#
# What it needs, and where it gets it (nothing is downloaded if it is already importable):
#   torch (with CUDA), timm, numpy, opencv (cv2), pyyaml, psutil, pillow   -- used as found
#   deaotpy (aot), segment-anything-hq, sam2 + hydra-core, omegaconf, antlr4-python3-runtime, iopath
#     -- from wheels in .whl/ if present (pip --no-index, into /tmp/hqsmem_site), else from PyPI
#        with pip if the machine reaches it; else it stops and names what is missing.
# torch is never installed or replaced: the machine's own build is used.
# Planned time with the defaults: about 8 minutes on an H100/H200, ESTIMATED from the per-model
# costs in the GPU anchors (never run on a GPU yet); give the device run timeout_s=600. Cut it with
# e.g. --sam2-frames 5000 --memory-frames 2000 (the JSON records the frames actually run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Pure-Python packages the device image lacks (versions as in this project's venv).
WHEELS=(deaotpy==1.11.0 segment-anything-hq==0.3 sam2==1.1.0 hydra-core==1.3.8 omegaconf==2.3.1
        antlr4-python3-runtime==4.9.3 iopath==0.1.10)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    PY=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
    mkdir -p .whl
    for spec in "${WHEELS[@]}"; do
        # A py3-none-any wheel if the index has one; else build it from the sdist (pure Python).
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec" 2>/dev/null \
            || "$PY" -m pip wheel -q --no-deps -w .whl "$spec"
    done
    ls -l .whl
    exit 0
fi

# The Python that has torch: $PYTHON, this checkout's venv, or the machine's python3.
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python
else PY=python3
fi
if ! "$PY" -c 'import torch' 2>/dev/null; then
    echo "gpu_bench: $PY has no torch; set PYTHON to a Python with a CUDA build of torch" >&2
    exit 2
fi
"$PY" -c 'import torch, sys; print("gpu_bench: python", sys.version.split()[0], "torch", torch.__version__,
          "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'

# module -> pip requirement
declare -A NEED=([timm]=timm [cv2]=opencv-python-headless [yaml]=pyyaml [psutil]=psutil [PIL]=pillow
                 [aot]=deaotpy [segment_anything_hq]=segment-anything-hq [sam2]=sam2 [hydra]=hydra-core
                 [omegaconf]=omegaconf [antlr4]=antlr4-python3-runtime [iopath]=iopath)
missing() {
    local out=()
    for mod in "${!NEED[@]}"; do "$PY" -c "import $mod" 2>/dev/null || out+=("${NEED[$mod]}"); done
    echo "${out[@]:-}"
}
MISSING=$(missing)
if [[ -n "$MISSING" ]]; then
    SITE=/tmp/hqsmem_site
    mkdir -p "$SITE"
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_bench: installing from .whl/ (no index): $MISSING"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
    else
        echo "gpu_bench: trying PyPI for: $MISSING (torch is left as it is)"
        # shellcheck disable=SC2086
        "$PY" -m pip install -q --no-deps --target "$SITE" $MISSING || true
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    MISSING=$(missing)
    if [[ -n "$MISSING" ]]; then
        echo "gpu_bench: still missing: $MISSING. Where there is PyPI, run scripts/gpu_bench.sh --fetch-wheels" \
             "and carry .whl/ to this machine." >&2
        exit 2
    fi
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1
exec "$PY" -m hqsmem_ros.tools.gpu_bench "$@"
