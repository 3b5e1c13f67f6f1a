#!/usr/bin/env bash
# The main job on a fresh machine, CPU only, a few minutes:
# venv -> synthetic dataset -> train (CPU preset) -> test (adaptive, then uniform) -> demo.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/venv.sh
PY=.venv/bin/python
if [ ! -f data/synthetic/occlusion.json ]; then
  $PY prepare.py --synthetic data/synthetic
fi
$PY prepare.py --check data/synthetic
# --overwrite: running the quickstart again replaces its own previous run, model/synthetic.
$PY train.py --data_dir data/synthetic --name synthetic --preset cpu --overwrite
$PY test.py --name synthetic
$PY test.py --name synthetic --weighting uniform
$PY demo.py --name synthetic --query_index 666
echo "done: model/synthetic/ holds opts.yaml, last.pt, train.log, train.jpg, result.txt, cmc.png, show.png"
