#!/usr/bin/env bash
# Set everything up, generate the built-in dataset, train configs/demo.yaml, evaluate, print the table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ ! -f data/synthetic/truth.json ]; then
  rawrestore synth --out data/synthetic --camera sony --scenes 24 --seed 0
fi
rawrestore train -c configs/demo.yaml --resume auto "$@"   # a rerun continues (or finds it done)
rawrestore eval -c configs/demo.yaml --checkpoint runs/demo/checkpoints/last.pt --split test --out runs/demo/eval "$@"
