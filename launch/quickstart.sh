#!/usr/bin/env bash
# Set everything up, then run the main job end to end on the built-in synthetic dataset:
# synthetic catalogue (MMRec form) -> prepared dataset -> train LGMRec -> full-ranking evaluation.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
work="${QUICKSTART_DIR:-$root/runs/quickstart}"
rm -rf "$work"
mkdir -p "$work"
lg=.venv/bin/lgmrec
$lg synth-mmrec --out "$work/raw" --users 2000 --items 1000 --interactions 40000 --seed 0
$lg import-mmrec --inter "$work/raw/synthetic.inter" \
    --feature image="$work/raw/image_feat.npy" --feature text="$work/raw/text_feat.npy" --out "$work/data"
$lg train --data "$work/data" --config configs/demo.yaml --out "$work/run" "$@"
echo "quickstart: metrics in $work/run/metrics.json, log in $work/run/train.log"
