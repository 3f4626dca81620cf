#!/usr/bin/env bash
# LGMRec on a Ray cluster with Ray Train (lgmrec_dist/ray_train.py: TorchTrainer, one rank per worker).
#
#   RAY_ADDRESS=http://HEAD:8265 bash launch/ray_train.sh \
#       --data /shared/prepared/baby --config configs/baby.yaml --out /shared/runs/baby-ray --num-workers 8 --use-gpu
#
# With RAY_ADDRESS (the head's dashboard address) the run is submitted with `ray job submit`: this
# checkout is uploaded as the job's working directory (files in .gitignore, such as .venv/, runs/ and
# data/, stay behind) and the entrypoint `python -m lgmrec_dist.ray_train ARGS` runs on the head node as
# the Ray driver; the cluster's image must have the dependencies installed (docs/cluster.md). Without
# RAY_ADDRESS it runs here, on a local Ray. The arguments are those of `python -m lgmrec_dist.ray_train
# --help`; --data and --out must be reachable by every worker (a shared filesystem on a cluster).
#
# Environment: RAY_ADDRESS, PYTHON (local interpreter; default .venv/bin/python, else python3),
#   RAY_JOB_PYTHON (interpreter on the cluster; default python), SUBMIT_ARGS (extra `ray job submit`
#   options, e.g. "--no-wait --submission-id baby-ray-1"), DRY_RUN=1 (print the command, run nothing).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "$#" -eq 0 ]; then
    echo "usage: [RAY_ADDRESS=http://HEAD:8265] bash launch/ray_train.sh --data DIR --config FILE --out RUNDIR --num-workers N [--use-gpu]" >&2
    exit 2
fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if [ -n "${RAY_ADDRESS:-}" ]; then
    # shellcheck disable=SC2206  # SUBMIT_ARGS is split on purpose
    extra=(${SUBMIT_ARGS:-})
    cmd=("$PYTHON" -m ray.scripts.scripts job submit --address "$RAY_ADDRESS" --working-dir "$root"
         "${extra[@]}" -- "${RAY_JOB_PYTHON:-python}" -m lgmrec_dist.ray_train "$@")
else
    cmd=("$PYTHON" -m lgmrec_dist.ray_train "$@")
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${cmd[@]}"
