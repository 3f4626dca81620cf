"""Process-group set-up from the torchrun environment (NCCL on CUDA, gloo on CPU)."""
from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from lgmrec_dist.errors import UserError

RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(UserError, RuntimeError):
    pass


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def close_process_group() -> None:
    """Leave the group: every rank arrives, then the group is destroyed (docs/distributed.md, "Gradients").

    gloo's threads take the GIL to release the tensors of a finished collective that Python can see, and the
    group's destructor joins those threads while holding the GIL: a release still waiting for the GIL then
    hangs the rank. So the objects that hold the group (the engines' DDP reducers) are collected first, while
    the group is still registered, and the GIL is let go for a moment after the last collective (the barrier)."""
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    time.sleep(0.05)
    dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def init_process_group(device: str = "auto", backend: str = "auto") -> Context:
    """Join the group described by torchrun's variables; one device per LOCAL_RANK."""
    missing = [v for v in RENDEZVOUS_VARS if v not in os.environ]
    if missing:
        raise LaunchError(f"missing rendezvous variable(s) {', '.join(missing)}: launch with torchrun "
                          f"(torchrun --nproc_per_node P -m lgmrec_dist.train ...) or set them yourself")
    rank, world, local = (int(os.environ[v]) for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise LaunchError("backend 'nccl' requested but torch sees no CUDA device; use gloo on CPU")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise LaunchError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) on this node")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world, store=_attempt_store(rank, world),
                                **({"device_id": dev} if dev.type == "cuda" else {}))
    return Context(rank, world, local, dev, backend)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store, with keys prefixed by torchrun's restart count.

    After ``torchrun --max-restarts`` restarts a group, the agent's store still holds the previous
    attempt's process-group keys (the peers' old addresses), and gloo tries to connect to dead processes
    (pytorch/pytorch#167288). A per-attempt prefix keeps each attempt's keys apart.
    """
    timeout = timedelta(minutes=int(os.environ.get("LGMREC_DIST_TIMEOUT_MIN", "30")))
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":   # the agent hosts the store
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timeout)
    else:
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=timeout, multi_tenant=True)
    return dist.PrefixStore(f"lgmrec/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
