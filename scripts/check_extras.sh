#!/usr/bin/env bash
# That the accelerator extras resolve against PyPI on top of the installed package (CI runs this; it needs PyPI, so
# it is not in the offline test suite): `pip install --dry-run` of .[gpu] and .[tpu], nothing installed.
#   bash scripts/check_extras.sh
set -euo pipefail
cd "$(dirname "$0")/.."
report=$(mktemp)
trap 'rm -f "$report"; rm -rf streamline_jax.egg-info' EXIT
for extra in gpu:jax-cuda12-plugin tpu:libtpu; do
  name=${extra%%:*} wanted=${extra##*:}
  : >"$report"
  .venv/bin/python -m pip install -q --dry-run --no-build-isolation --report "$report" ".[$name]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  if ! .venv/bin/python - "$report" "$wanted" <<'PY'
import json, sys
installs = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.load(open(sys.argv[1]))["install"]}
jax = __import__("importlib.metadata").metadata.version("jax")
found = installs.get(sys.argv[2])
print(f"{sys.argv[2]}: {found or 'not in the resolution'} (jax {installs.get('jax', jax)})")
sys.exit(0 if found else 1)
PY
  then
    echo "check_extras: .[$name] does not bring $wanted" >&2
    exit 1
  fi
done
