#!/usr/bin/env bash
# What a user gets from `pip install .`: a fresh virtual environment with delift installed (not editable),
# then the `delift` command from an empty folder, with the configs shipped inside the package.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
VENV="$scratch/venv" DELIFT_SPEC="$root" bash "$root/scripts/setup.sh"
mkdir "$scratch/work" && cd "$scratch/work"
"$scratch/venv/bin/delift" model=tiny_qwen2 selector=random trainer.max_steps=2 eval.max_new_tokens=4 progress=false
results=$(find outputs/runs -name results.json)
[ -n "$results" ] || { echo "check_install: no results.json under $scratch/work/outputs" >&2; exit 1; }
"$scratch/venv/bin/python" - "$results" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))
assert results["selector"] == "random" and results["n_selected"] > 0, results
print(f"check_install: delift from a fresh pip install selected {results['n_selected']} of {results['n_pool']}")
PY
