#!/usr/bin/env bash
# CI check: the function's requirements.txt installs with `pip install --require-hashes` on a fresh machine.
#
#   bash infra/rotation_function/verify_lock.sh
#
# Builds the apimvault wheel from this repository into a temporary wheelhouse, writes a temporary copy of
# requirements.txt whose apimvault line carries that wheel's sha256 (the committed file keeps its placeholder;
# build_package.sh does the same rewrite for a real package), and installs the copy into a throwaway venv with
# --require-hashes: pip refuses the run if any package, transitive ones included, lacks a matching hash or an
# == pin. Binary wheels only, as build_package.sh installs for the Functions runtime. Nothing is kept.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mkdir -p "$work/wheels"
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --wheel-dir "$work/wheels" "$repo"
wheel="$(ls "$work"/wheels/apimvault-*.whl)"
name="$(basename "$wheel")"
hash="$(sha256sum "$wheel" | cut -d' ' -f1)"
sed -E "s|^apimvault\[rotation\] @ file://\\$\{APIMVAULT_WHEELHOUSE\}/[^#]+#sha256=[0-9a-f]{64}$|apimvault[rotation] @ file://\${APIMVAULT_WHEELHOUSE}/${name}#sha256=${hash}|" \
  "$here/requirements.txt" > "$work/requirements.txt"
grep -q "#sha256=${hash}\$" "$work/requirements.txt" || { echo "verify_lock: no apimvault wheel line to pin" >&2; exit 1; }

"$python" -m venv "$work/venv"
APIMVAULT_WHEELHOUSE="$work/wheels" "$work/venv/bin/python" -m pip install --quiet --disable-pip-version-check \
  --require-hashes --only-binary=:all: -r "$work/requirements.txt"
"$work/venv/bin/python" -c "import azure.functions, apimvault.rotation, azure.mgmt.apimanagement, azure.storage.blob"
echo "verify_lock: pip install --require-hashes -r requirements.txt OK ($("$work/venv/bin/python" -m pip list --format=freeze | wc -l) packages, $name sha256=$hash)"
