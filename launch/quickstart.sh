#!/usr/bin/env bash
# Set everything up, then run the main job end to end on the built-in synthetic catalogue:
# synth (raw Parquet logs + item features) -> prep (Ray job: validated, k-core, split, partitioned)
# -> train LGMRec -> full-ranking evaluation (metrics table) -> export of embeddings and recommendations.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
work="${QUICKSTART_DIR:-$root/runs/quickstart}"
rm -rf "$work"
mkdir -p "$work"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
lg=.venv/bin/lgmrec
$lg synth --users 2000 --items 1000 --interactions 40000 --modalities image:128,text:64 --seed 0 --out "$work/raw"
$lg prep --interactions "$work/raw/interactions" --item-features image="$work/raw/features/image.parquet" \
    --item-features text="$work/raw/features/text.parquet" --kcore 5 --split mmrec --partitions 2 --out "$work/data"
$lg train --data "$work/data" --config configs/demo.yaml --out "$work/run" "$@"
$lg export --run "$work/run" --out "$work/export" --top-k 20
echo "quickstart: metrics in $work/run/metrics.json, report in $work/run/report.md, recommendations in $work/export"
