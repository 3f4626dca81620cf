"""Train LGMRec with Ray Train: a ``TorchTrainer`` whose workers run the same loop as torchrun's ranks.

    python -m lgmrec_dist.ray_train --data DIR --config FILE --out RUNDIR --num-workers N [--use-gpu]
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m lgmrec_dist.ray_train --data /shared/prepared --config configs/baby.yaml \\
        --out /shared/runs/baby-ray --num-workers 8 --use-gpu

Ray Train starts N worker actors (``ScalingConfig(num_workers, use_gpu)``) and initialises the torch
process group itself (gloo on CPU, NCCL with one GPU per worker). Each worker then builds the
``Context`` that torchrun's ranks get from ``init_process_group`` — from the live process group
(rank, world size, backend) and Ray's device for the worker — and calls
``lgmrec_dist.train.train``: the sharded engine, the global batch semantics and therefore the
metrics are those of ``torchrun --nproc_per_node N`` (tests/test_launchers.py compares them).

The run directory: ``RunConfig(storage_path=RUNDIR's parent, name=RUNDIR's name)``, so Ray Train's
experiment directory *is* the run directory. The workers write into it exactly as torchrun's ranks
do (rank 0: metrics.json, config.yaml, train.log, epochs.jsonl, tb/, report.md; every rank: its
shard of each checkpoint under checkpoints/ and best/). It must therefore be a path every worker
can reach: any local path on one machine, a shared filesystem (NFS, a ReadWriteMany volume) on a
cluster. With ``--max-failures K`` Ray restarts a failed worker group up to K times and the loop
resumes from the latest checkpoint in the run directory (train's automatic resume).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def context_from_process_group(device=None):
    """A ``distributed.group.Context`` for a process group that someone else initialised (Ray Train)."""
    import torch
    import torch.distributed as dist

    from lgmrec_dist.distributed.group import Context

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised (is this a Ray Train worker?)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        try:
            from ray.train.torch import get_device
            device = get_device()
        except Exception:  # noqa: BLE001 - outside a Ray Train worker
            device = torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        local_rank = device.index if device.index is not None else local_rank
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())


def _flat_metrics(metrics: dict) -> dict:
    out = {k: metrics[k] for k in ("best_epoch", "epochs_run", "steps", "seconds_per_epoch", "seconds_per_step",
                                   "world_size") if k in metrics}
    for split in ("valid", "test"):
        for k, v in (metrics.get(split) or {}).items():
            out[f"{split}/{k}"] = v
    return out


def train_loop_per_worker(config: dict) -> None:
    """Body of every Ray Train worker: the same ``train()`` as torchrun's ranks."""
    import ray.train

    from lgmrec_dist.config import load_config
    from lgmrec_dist.train import train

    cfg = load_config(None, config["config"])
    ctx = context_from_process_group()
    metrics = train(config["data"], cfg, config["out"], overwrite=False, ctx=ctx)
    # every worker reports once (a barrier); rank 0 registers RUNDIR/best (the model at the best-validation
    # epoch, already inside Ray's experiment directory, so nothing is copied) as the run's Ray checkpoint
    best = Path(config["out"]) / "best"
    try:
        from ray.train import Checkpoint, CheckpointUploadMode
    except ImportError:  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0): metrics only
        ray.train.report(_flat_metrics(metrics))
        return
    checkpoint = Checkpoint.from_directory(str(best)) if ctx.is_main and (best / "meta.json").is_file() else None
    ray.train.report(_flat_metrics(metrics), checkpoint=checkpoint,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def run_ray_train(data: str | Path, cfg, out: str | Path, num_workers: int = 2, use_gpu: bool = False,
                  cpus_per_worker: float = 1, max_failures: int = 0, overwrite: bool = False):
    """Run the trainer from a Ray driver (``ray.init`` already done); returns Ray's ``Result``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from lgmrec_dist.config import ConfigError

    out = Path(out).resolve()
    if (out / "metrics.json").exists():
        if not overwrite:
            raise ConfigError(f"{out} already holds a finished run (metrics.json); pass --overwrite to replace it")
    if overwrite and out.exists():
        # done here, once, and not in the workers: a worker group restarted after a failure must resume
        shutil.rmtree(out)
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"data": str(Path(data).resolve()), "out": str(out), "config": cfg.to_dict()},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=out.name, storage_path=str(out.parent),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    return trainer.fit()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset directory, readable by every worker")
    p.add_argument("--config", help="YAML config (configs/*.yaml)")
    p.add_argument("--out", required=True,
                   help="run directory, reachable by every worker (shared filesystem on a cluster); it is also "
                        "Ray Train's experiment directory (RunConfig storage_path = its parent)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--num-workers", type=int, default=2, help="Ray Train workers = ranks (default 2)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs reserved per worker (default 1)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="restart a failed worker group up to K times; it resumes from the latest checkpoint")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: RAY_ADDRESS, as set by `ray job submit`, else a local Ray)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def run(args) -> int:
    from lgmrec_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.set)
        if args.num_workers < 1:
            raise ConfigError("--num-workers: must be >= 1")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    if not ray.is_initialized():
        ray.init(address=args.address)  # None: RAY_ADDRESS (ray job submit) or a new local instance
    try:
        result = run_ray_train(args.data, cfg, args.out, num_workers=args.num_workers, use_gpu=args.use_gpu,
                               cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                               overwrite=args.overwrite)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - Ray Train v2 raises TrainingFailedError / WorkerGroupError
        print(f"error: training failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if getattr(result, "error", None) is not None:
        print(f"error: training failed: {result.error}", file=sys.stderr)
        return 1
    m = result.metrics or {}
    print(f"run directory {Path(args.out).resolve()}: best epoch {m.get('best_epoch')}, "
          f"valid recall@20 {m.get('valid/recall@20')}, test recall@20 {m.get('test/recall@20')}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ray-train", help="train with Ray Train (TorchTrainer), e.g. under `ray job submit`",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lgmrec_dist.ray_train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
