#!/usr/bin/env bash
# Creates (or tops up) the project's virtual environment at .venv in the repo root.
# Idempotent: a second run with nothing changed only checks a stamp file.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
py="${PYTHON:-python3}"
# PYTHON picks the interpreter of a new .venv (e.g. PYTHON=python3.12 in another clone); an
# existing .venv made with another Python version is never silently used in its place.
if [ -n "${PYTHON:-}" ] && [ -x "$venv/bin/python" ]; then
  version='import sys; print("%d.%d" % sys.version_info[:2])'
  have="$("$venv/bin/python" -c "$version")"
  asked="$("$PYTHON" -c "$version")"
  if [ "$have" != "$asked" ]; then
    echo "setup_venv.sh: $venv has Python $have, PYTHON=$PYTHON is $asked: remove $venv or use another clone" >&2
    exit 1
  fi
fi
stamp="$venv/.hqsmem-setup"
want="$(cat "$root/setup.py" "$root/scripts/setup_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install --upgrade pip setuptools wheel >/dev/null
# torch is deliberately unpinned (Jetson users bring NVIDIA's wheels); torchvision must match it.
# cluster: Ray for `hqsmem bags --ray` and its tests (a wheel; about 6 s to install here).
"${pip[@]}" install -e "$root[test,models,cluster]"
# DeAOT's official code (deaotpy, BSD-3) without its declared spatial-correlation-sampler
# dependency: a CUDA extension built from source that the engine only uses, when present, for speed.
"${pip[@]}" install --no-deps "deaotpy>=1.11"
# SAM 2.1 (PyPI `sam2`, Apache-2.0, only an sdist): its build requires torch, so it is built
# against the installed torch (an isolated build would download a second one) and without its
# optional CUDA kernel (hole filling of output masks; SAM2_BUILD_CUDA=1 to try building it).
# --no-deps keeps pip away from torch; its runtime needs are hydra-core and iopath.
"${pip[@]}" install "hydra-core>=1.3.2" "iopath>=0.1.10"
SAM2_BUILD_CUDA="${SAM2_BUILD_CUDA:-0}" "${pip[@]}" install --no-deps --no-build-isolation "sam2==1.1.0"
echo "$want" > "$stamp"
