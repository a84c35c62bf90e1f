#!/usr/bin/env bash
# Set everything up, generate the built-in dataset, train configs/demo.yaml, evaluate, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# (re)generate the built-in data when it is missing or was written by an older `rawrestore synth`
if ! python -c "import json, sys; from rawrestore.data.synth import TRUTH_FORMAT as f; \
sys.exit(json.load(open('data/synthetic/truth.json')).get('format') != f)" 2>/dev/null; then
  rawrestore synth --out data/synthetic --camera sony --scenes 24 --seed 0 --force
fi
rawrestore train -c configs/demo.yaml --resume auto "$@"   # a rerun continues (or finds it done)
eval_args=()  # key=value overrides go to eval too; train's own flags (e.g. --no-progress) do not
for arg in "$@"; do [[ "$arg" == --* ]] || eval_args+=("$arg"); done
rawrestore eval -c configs/demo.yaml --checkpoint runs/demo/checkpoints/last.pt --split test --out runs/demo/eval ${eval_args[@]+"${eval_args[@]}"}
