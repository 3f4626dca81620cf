#!/usr/bin/env bash
# One script for the GPU checks (run on a GPU machine after launch/setup.sh; the project itself never
# needs a GPU). Prints: CUDA visible, an NCCL group with one rank per GPU, a CUDA training run end to
# end, and the distributed benchmark with NCCL ("dist"); the sampled-vs-exact comparison at
# 1x, 10x and 30x Baby plus the 10M-interaction epoch on CUDA ("sampled", docs/sampled.md); "lse": the
# low-rank log-sum-exp's torch.compile form on CUDA against the direct form (equality of the value and
# both gradients, timing; docs/model.md "Speed rewrites" 3), then a CUDA training run with each form.
#   bash bench/gpu_check.sh [all|dist|sampled|lse]
set -euo pipefail
what=${1:-all}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=.venv/bin/python
ngpu=$("$py" -c "import torch; print(torch.cuda.device_count())")
echo "gpus: $ngpu"; [ "$ngpu" -ge 1 ] || { echo "no CUDA device"; exit 1; }
if [ "$what" = all ] || [ "$what" = lse ]; then
    # exits non-zero (and so stops this script) if the compiled form deviates from the direct one by > 1e-4
    "$py" bench/bench_lse.py --device cuda --forms compiled direct
fi
if [ "$what" = all ] || [ "$what" = sampled ]; then
    "$py" bench/bench_sampled.py --scales 1 10 30 --paired --steps 50 --exact-steps 10
    "$py" bench/bench_sampled.py --epoch-10m
fi
[ "$what" = all ] || [ "$what" = dist ] || [ "$what" = lse ] || exit 0
work=$(mktemp -d)
.venv/bin/lgmrec synth-mmrec --out "$work/raw" --users 4000 --items 2000 --interactions 80000 --seed 0
.venv/bin/lgmrec import-mmrec --inter "$work/raw/synthetic.inter" --feature image="$work/raw/image_feat.npy" \
    --feature text="$work/raw/text_feat.npy" --out "$work/data"
# single process on CUDA (the log-sum-exp takes its compiled form there)
.venv/bin/lgmrec train --data "$work/data" --config configs/demo.yaml --out "$work/run1" --set device=cuda --set epochs=3
if [ "$what" = lse ]; then  # the same run with the direct form: the same metrics to float tolerance
    LGMREC_LSE=direct .venv/bin/lgmrec train --data "$work/data" --config configs/demo.yaml --out "$work/run1d" \
        --set device=cuda --set epochs=3
    "$py" -c "import json; a,b=(json.load(open(f'$work/{r}/metrics.json')) for r in ('run1','run1d')); print('compiled vs direct log-sum-exp on CUDA: test recall@20', a['test']['recall@20'], b['test']['recall@20'], 's/step', a['seconds_per_step'], b['seconds_per_step'])"
    exit 0
fi
# NCCL, one rank per GPU (exact distributed path)
"$py" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" -m lgmrec_dist.train --data "$work/data" \
    --config configs/demo.yaml --out "$work/runP" --set device=cuda --set epochs=3
"$py" -c "import json,sys; a,b=(json.load(open(f'$work/{r}/metrics.json')) for r in ('run1','runP')); print('1 GPU vs', b['world_size'], 'ranks: test recall@20', a['test']['recall@20'], b['test']['recall@20'], 's/step', a['seconds_per_step'], b['seconds_per_step'])"
"$py" bench/bench_dist.py --device cuda --nprocs $(seq -s ' ' 1 "$ngpu")
