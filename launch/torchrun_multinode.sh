#!/usr/bin/env bash
# Multi-node exact distributed training: run this script once on EVERY node (all with the same arguments).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/torchrun_multinode.sh \
#       --data /shared/prepared/baby --config configs/baby.yaml --out /shared/runs/baby-2x8     # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash launch/torchrun_multinode.sh ...same arguments  # on node1
#
# torchrun's c10d rendezvous runs on MASTER_ADDR:MASTER_PORT (a TCP store hosted by the torchrun agent of
# the node whose address that is). The arguments are those of `lgmrec train` (lgmrec_dist.train);
# --data and --out must be on a filesystem that every node sees (every rank writes its checkpoint shard).
#
# Environment (Slurm's variables are used when the plain ones are unset, see launch/slurm.sbatch):
#   NNODES          number of nodes               (else SLURM_NNODES, else 1)
#   NODE_RANK       this node's rank, 0..NNODES-1  (else SLURM_NODEID, else 0)
#   NPROC_PER_NODE  processes (ranks) per node    (else SLURM_GPUS_ON_NODE, else the GPUs nvidia-smi lists, else 1)
#   MASTER_ADDR     rendezvous host               (required when NNODES > 1; default 127.0.0.1)
#   MASTER_PORT     rendezvous port               (default 29400)
#   RDZV_ID         job id shared by all nodes     (else SLURM_JOB_ID, else "lgmrec")
#   PYTHON          interpreter with lgmrec_dist  (else .venv/bin/python of this repository, else python3)
#   DRY_RUN=1       print the torchrun command instead of running it
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

nnodes="${NNODES:-${SLURM_NNODES:-1}}"
node_rank="${NODE_RANK:-${SLURM_NODEID:-0}}"
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE="${SLURM_GPUS_ON_NODE:-}"
    if [ -z "$NPROC_PER_NODE" ] && command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    fi
    [ -n "$NPROC_PER_NODE" ] && [ "$NPROC_PER_NODE" != 0 ] || NPROC_PER_NODE=1
fi
if [ "$nnodes" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
    echo "torchrun_multinode: MASTER_ADDR is required with NNODES=$nnodes (the rendezvous host)" >&2
    exit 2
fi
if [ "$node_rank" -ge "$nnodes" ]; then
    echo "torchrun_multinode: NODE_RANK=$node_rank but NNODES=$nnodes" >&2
    exit 2
fi
master_addr="${MASTER_ADDR:-127.0.0.1}"
master_port="${MASTER_PORT:-29400}"
rdzv_id="${RDZV_ID:-${SLURM_JOB_ID:-lgmrec}}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

cmd=("$PYTHON" -m torch.distributed.run
     --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$master_addr:$master_port" --rdzv_id "$rdzv_id"
     -m lgmrec_dist.train "$@")
echo "torchrun_multinode: node $node_rank of $nnodes, $NPROC_PER_NODE rank(s) per node, rendezvous $master_addr:$master_port ($rdzv_id)" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's lgmrec_dist, whatever the cwd
exec "${cmd[@]}"
