#!/usr/bin/env bash
# Build the rotation function's deployment package with apimvault from this repository, pinned by hash.
#
#   bash infra/rotation_function/build_package.sh        # then: func azure functionapp publish <app> --python --no-build
#
# 1. Builds the apimvault wheel from the repository root into infra/rotation_function/wheels/ (gitignored).
# 2. Writes that wheel's sha256 into the apimvault line of requirements.txt (the only line that names it).
# 3. Installs requirements.txt (hash-locked by lock.sh: every package pinned with its sha256) with
#    --require-hashes into .python_packages/lib/site-packages for the Functions runtime (Linux x86-64,
#    CPython 3.11, binary wheels only), with APIMVAULT_WHEELHOUSE pointing at the wheel folder: pip verifies the
#    wheel's hash and never asks an index for "apimvault".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
wheels="$here/wheels"

rm -rf "$wheels" "$here/.python_packages"
mkdir -p "$wheels"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" "$repo"
wheel="$(ls "$wheels"/apimvault-*.whl)"
name="$(basename "$wheel")"
hash="$(sha256sum "$wheel" | cut -d' ' -f1)"
sed -i -E "s|^apimvault\[rotation\] @ file://\\$\{APIMVAULT_WHEELHOUSE\}/[^#]+#sha256=[0-9a-f]{64}$|apimvault[rotation] @ file://\${APIMVAULT_WHEELHOUSE}/${name}#sha256=${hash}|" \
  "$here/requirements.txt"
grep -q "#sha256=${hash}\$" "$here/requirements.txt" || { echo "build_package: could not pin $name in requirements.txt" >&2; exit 1; }
echo "build_package: pinned $name sha256=$hash"

APIMVAULT_WHEELHOUSE="$wheels" "$python" -m pip install --quiet --require-hashes \
  --target "$here/.python_packages/lib/site-packages" \
  --platform manylinux2014_x86_64 --python-version 3.11 --implementation cp --only-binary=:all: \
  -r "$here/requirements.txt"
echo "build_package: dependencies in $here/.python_packages; publish with: func azure functionapp publish <app> --python --no-build"
