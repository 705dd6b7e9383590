#!/usr/bin/env bash
# Download, on a machine with network access, the Python packages that bench/gpu_check.sh
# needs on the GPU machine and that its image lacks: the linear-assignment peers lap (a
# wheel for CPython 3.12, x86-64), lapjv (an sdist: PyPI has no CPython 3.12 Linux wheel
# of it) and torch-linear-assignment (an sdist: its CUDA extension must be built there,
# against that machine's torch). gpu_check.sh builds the sdists there, each skipped with
# a message when its build fails. They go to .whl/ at the
# repository root, which .git/info/exclude ignores, and travel with `carry: [".whl"]`.
#
# Not fetched: flwr. Its 1.4x releases need fastapi, pydantic, sqlalchemy, alembic, uv,
# uvicorn, cryptography and more (tens of MiB, and versions that would have to match the
# image's protobuf and grpcio); tests/wsa/test_flower.py skips itself without it.
#
# Usage: bench/gpu_wheels.sh [PYTHON]   (PYTHON: the interpreter whose pip downloads)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$root/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
dest="$root/.whl"
mkdir -p "$dest"

# The peers, pinned so that one version of each travels (two would stop the install).
WHEELS=("lap==0.5.13")
SDISTS=("lapjv==1.3.29" "torch-linear-assignment==0.1.0")
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

exclude="$(git -C "$root" rev-parse --git-common-dir)/info/exclude"
case "$exclude" in /*) ;; *) exclude="$root/$exclude" ;; esac
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
for spec in "${WHEELS[@]}"; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d "$dest" "$spec"
done
# An sdist: no metadata build here (it would pull torch into an isolated environment).
for spec in "${SDISTS[@]}"; do
  "$python" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation -d "$dest" "$spec"
done

echo "bench/gpu_wheels.sh: in $dest:"
ls -l "$dest"
total=$(du -sk "$dest" | cut -f1)
echo "total ${total} KiB (the working tree and carried paths travel within 64 MiB)"
