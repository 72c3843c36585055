#!/usr/bin/env bash
# Policy checks over infra/: checkov (Bicep framework) offline, in its own virtual environment.
#
#   bash infra/ci-checks.sh            # from the repo root or anywhere
#
# - checkov lives in infra/.venv-checkov (gitignored), installed from the pin in requirements-checkov.txt;
#   its dependency pins never meet the package's own environment. The venv is rebuilt only when the pin
#   file changes (a stamp file records its hash), so re-runs take seconds.
# - No network beyond the package install: no Prisma Cloud / Bridgecrew API key, no guideline or mapping
#   download, no update check, no SCA, no external modules.
# - Parse errors fail the run (CKV_PARSE_ERROR_FAIL), as does any failed check. Skips live inline next to the
#   resource they concern (// checkov:skip=ID: reason), never in a config file.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv-checkov"
req="$here/requirements-checkov.txt"
stamp="$venv/.requirements.sha256"
python="${PYTHON:-python3}"

want="$(sha256sum "$req" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/checkov" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "ci-checks: creating $venv from $(basename "$req")"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi

# Offline: see shared reference infra-security.md section 3.4.
unset BC_API_KEY PRISMA_API_URL BC_SOURCE BC_SOURCE_VERSION
export BC_SKIP_MAPPING=TRUE
export CKV_SKIP_PACKAGE_UPDATE_CHECK=true
export CHECKOV_RUN_SCA_PACKAGE_SCAN_V2=false
export CKV_PARSE_ERROR_FAIL=true
export ANSI_COLORS_DISABLED=true
export LOG_LEVEL="${LOG_LEVEL:-WARNING}"

echo "ci-checks: checkov $("$venv/bin/checkov" --version | head -n1)"
cd "$here"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
"$venv/bin/checkov" \
  --directory . \
  --framework bicep \
  --skip-download \
  --skip-path .venv-checkov \
  --compact \
  --output cli \
  "$@" 2> >(tee "$log" >&2) || status=$?
wait

# checkov logs a check that raised while evaluating a resource and leaves it out of the report, so
# "0 failed" could hide a check that never ran. Every such error must be listed, with its reason, in
# checkov-known-errors.txt (and covered by tests/infra/test_bicep_policy.py); any other one fails the run.
known="$here/checkov-known-errors.txt"
errors="$(grep -oE 'Failed to run check [A-Z0-9_]+ on [^ ]+' "$log" | sed 's/^Failed to run check //; s/ on / /' | sort -u || true)"
if [[ -n "$errors" ]]; then
  while read -r check where; do
    if grep -qE "^${check}[[:space:]]+${where//./\\.}([[:space:]]|$)" "$known" 2>/dev/null; then
      echo "ci-checks: known: $check could not evaluate $where (see $(basename "$known"))"
    else
      echo "ci-checks: ERROR: $check raised on $where and was left out of the report" >&2
      status=1
    fi
  done <<< "$errors"
fi
if [[ $status -eq 0 ]]; then
  echo "ci-checks: checkov passed"
else
  echo "ci-checks: checkov FAILED (exit $status)" >&2
fi
exit "$status"
