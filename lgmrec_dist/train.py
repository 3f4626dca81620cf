"""Train LGMRec on a prepared dataset and evaluate it with the MMRec protocol (docs/model.md §1.8-§2).

    python -m lgmrec_dist.train --data DIR --config FILE --out RUNDIR [--set key=value ...]
    lgmrec train ...   (same arguments)

Writes RUNDIR/metrics.json, RUNDIR/config.yaml (the resolved config) and RUNDIR/train.log.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import signal
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from lgmrec_dist.batches import EpochBatches, TripleSampler
from lgmrec_dist.checkpoint import Checkpointer, CheckpointError, RunLock, rng_state, set_rng_state
from lgmrec_dist.config import Config, ConfigError, load_config
from lgmrec_dist.dataset import TEST, TRAIN, VALID, PreparedDataset, atomic_write_json
from lgmrec_dist.engines import build_engine, device_for
from lgmrec_dist.entry import guarded
from lgmrec_dist.errors import UserError
from lgmrec_dist.evaluation import EarlyStopping, Evaluator
from lgmrec_dist.observe import RunLog

log = logging.getLogger("lgmrec")


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a loss term turned NaN/inf); the last good checkpoint is kept."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset directory (lgmrec import-mmrec / prep)")
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults are the official settings")
    p.add_argument("--out", required=True, help="run directory for metrics.json, config.yaml, train.log")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run (or checkpoints) in --out")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (automatic when one exists)")
    p.add_argument("--init-from", metavar="RUN",
                   help="warm start: a finished run's best model, rows carried over by raw id (docs/serving.md)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _LogFile(logging.FileHandler):
    """train.log. A line that cannot be written (a full disk) is dropped instead of printing a traceback per
    line: the run's next checkpoint or metrics write fails with the one error line (docs/failures.md)."""

    def handleError(self, record) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


def set_determinism(on: bool) -> None:
    """``deterministic`` (docs/model.md, "Reproducibility"). The model's own kernels have a fixed reduction
    order either way; ``on`` also has torch pick the deterministic variant of its kernels (warning, not
    failing, where one has none), without filling fresh tensors with NaN: that guards against reading
    uninitialised memory, which nothing here does, at the price of one more pass over every new tensor."""
    torch.use_deterministic_algorithms(on, warn_only=True)
    if on:
        torch.utils.deterministic.fill_uninitialized_memory = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (_LogFile(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def load_dataset(data, cfg: Config, ctx=None):
    """The whole prepared dataset, or on P ranks of a dataset partitioned for P only this rank's partition
    (``distributed.partitioned``)."""
    if ctx is not None:
        from lgmrec_dist.distributed.partitioned import open_rank_partition, uses_partitions
        if uses_partitions(data, cfg, ctx.world_size):
            return open_rank_partition(data, ctx)
    return PreparedDataset.load(data)


def _partitioned(ds) -> bool:
    from lgmrec_dist.dataset_parts import PartitionData
    return isinstance(ds, PartitionData)


def make_evaluators(ds, cfg: Config) -> tuple[Evaluator, Evaluator]:
    """Validation and test evaluators of the users ``ds`` holds (every user, or a partition's)."""
    gather = None
    if _partitioned(ds):
        from lgmrec_dist.distributed.partitioned import gather_hashes as gather
    tu, ti = ds.pairs(TRAIN)
    make = lambda label, users=0: Evaluator(ds.num_users, ds.num_items, tu, ti, *ds.pairs(label),  # noqa: E731
                                            ks=cfg.topk, batch_size=cfg.eval_batch_size,
                                            item_tile=cfg.eval_item_tile, max_users=users, seed=cfg.seed,
                                            gather=gather)
    return make(VALID, cfg.valid_users), make(TEST)


def triple_sampler(ds, cfg: Config) -> tuple[TripleSampler, object]:
    """The training triples of the pairs ``ds`` holds, and how a batch is put together (None: locally)."""
    if _partitioned(ds):
        from lgmrec_dist.distributed.partitioned import gather_batch, partition_triples
        return partition_triples(ds, cfg.seed), gather_batch
    return TripleSampler(ds.num_items, *ds.pairs(TRAIN), cfg.seed), None


def summary_table(valid: dict, test: dict, ks: list[int]) -> str:
    """Metrics at the best-validation epoch: one row per metric, K across, valid then test."""
    cols = [f"@{k}" for k in ks]
    width = 8 * len(ks)
    lines = [f"{'':<10}{'valid':^{width}} | {'test':^{width}}",
             f"{'metric':<10}" + "".join(f"{c:>8}" for c in cols) + " | " + "".join(f"{c:>8}" for c in cols)]
    for name in ("recall", "ndcg", "precision", "map"):
        cells = [[f"{m.get(f'{name}@{k}', float('nan')):>8.4f}" for k in ks] for m in (valid, test)]
        lines.append(f"{name:<10}" + "".join(cells[0]) + " | " + "".join(cells[1]))
    return "\n".join(lines)


def _fault_injection(step: int, ctx) -> None:
    """LGMREC_KILL_AT_STEP=k [LGMREC_KILL_RANK=r]: SIGKILL this process right after optimizer step k, on
    the first attempt of a torchrun job only. Fault-tolerance tests use it to kill a rank mid-epoch at a
    known point; it is inert unless the variable is set."""
    at = os.environ.get("LGMREC_KILL_AT_STEP")
    if at is None or step != int(at) or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if int(os.environ.get("LGMREC_KILL_RANK", "0")) == (ctx.rank if ctx else 0):
        os.kill(os.getpid(), signal.SIGKILL)


def _fresh_loop() -> dict:
    """Where the loop is and what it has accumulated: everything a resumed run needs to continue."""
    return {"epoch": 0, "batch": 0, "step": 0, "epoch_sums": {}, "epoch_steps": 0, "epoch_samples": 0,
            "epoch_elapsed": 0.0, "epoch_seconds": [], "train_loss": [], "best_valid": {}, "best_test": {},
            "epochs_run": 0}


def _trim_epoch_log(run_dir: Path, before_epoch: int) -> None:
    """Keep the epoch records of epochs before ``before_epoch``: on resume, records written after the
    checkpoint are dropped (they will be written again); a fresh run starts from an empty log."""
    path = run_dir / "epochs.jsonl"
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["epoch"] < before_epoch]
        path.write_text("".join(line + "\n" for line in keep))


def train(data: str | Path, cfg: Config, out: str | Path, overwrite: bool = False, ctx=None,
          resume: bool | None = None, init_from: str | Path | None = None) -> dict:
    """Train and evaluate; ``ctx`` (a distributed.group.Context) for a launch on P ranks (``engines.build_engine``).

    ``resume``: None = continue from the run directory's latest checkpoint when there is one,
    True = require one, False = start afresh (an existing checkpoint is then an error).
    """
    main_rank = ctx is None or ctx.is_main
    run_dir = Path(out)
    # every check that can refuse the run comes before the first write to run_dir (docs/failures.md)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run directory")
    if (run_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{run_dir} already holds a finished run (metrics.json); pass --overwrite to replace it")
    ds = load_dataset(data, cfg, ctx)
    if ctx is None:
        device_for(cfg)
    ckpt = Checkpointer(run_dir, cfg, ds.manifest, ds.path)
    if _resumable(ckpt, run_dir, overwrite, resume, ctx.world_size if ctx else 1) is None and init_from is not None:
        from lgmrec_dist.warmstart import check_warm_start
        check_warm_start(init_from, cfg, ds)
    lock = RunLock(run_dir).acquire() if main_rank else None
    try:
        with contextlib.ExitStack() as cleanup:
            return _train(ds, cfg, run_dir, overwrite, ctx, resume, main_rank, ckpt, cleanup, init_from)
    finally:
        if lock is not None:
            lock.release()


def _resumable(ckpt: Checkpointer, run_dir: Path, overwrite: bool, resume: bool | None, world_size: int):
    """The checkpoint this run continues from (None: a fresh start), or a CheckpointError; reads only."""
    latest = None if overwrite else ckpt.latest()
    if resume and latest is None:
        raise CheckpointError(f"--resume: {run_dir} holds no complete checkpoint")
    if resume is False and latest is not None:
        raise CheckpointError(f"{run_dir} holds checkpoint {latest.name}; resume it, or pass --overwrite")
    if latest is not None:
        ckpt.check(latest, world_size)
    return latest


def _check_finite(terms: dict, step: int, ckpt: Checkpointer) -> None:
    """Stop at the first step whose loss is NaN/inf: nothing after it is saved or evaluated."""
    bad = sorted((k for k, v in terms.items() if not math.isfinite(v)), key=lambda k: k == "loss")  # a term first
    if bad:
        last = ckpt.latest()
        raise TrainingError(f"step {step}: loss term {bad[0]!r} is {terms[bad[0]]} ("
                            + ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
                            + "); training stopped, nothing after the last good checkpoint was written ("
                            + (f"{last}" if last else "none yet") + "); lower learning_rate or check the features")


def _best_test_metrics(engine, test_eval, best_emb, ds, run_dir: Path) -> dict:
    """Test metrics of the best-validation epoch, ranked once after training (the same numbers as ranking at
    that epoch: inference without Gumbel noise is a function of the parameters). A run resumed after its
    best epoch no longer holds that epoch's embeddings: the engine then takes the best model's parameters
    (RUNDIR/best, read back as a warm start from this very run) and infers them again."""
    if best_emb is None:
        from lgmrec_dist.warmstart import warm_start
        warm_start(engine, ds, run_dir)
        log.info("resumed after the best epoch: the best model of this run taken back from %s", run_dir / "best")
        best_emb = engine.embeddings()
    log.info("ranking the test set with the best-validation model")
    return engine.evaluate(test_eval, best_emb)


def _train(ds, cfg, run_dir, overwrite, ctx, resume, main_rank, ckpt, cleanup, init_from=None) -> dict:
    if overwrite and main_rank:
        shutil.rmtree(ckpt.dir, ignore_errors=True)
        shutil.rmtree(ckpt.best_dir, ignore_errors=True)
    if ctx is not None:
        import torch.distributed as dist
        dist.barrier()
    # again under the lock: another run may have written a checkpoint since the first look
    latest = _resumable(ckpt, run_dir, False, resume, ctx.world_size if ctx else 1)
    if main_rank:
        ckpt.remove_stale()
        setup_logging(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        log.setLevel(logging.WARNING)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    set_determinism(cfg.deterministic)
    seed_everything(cfg.seed)
    log.info("dataset %s: %d users, %d items, %d train / %d valid / %d test, modalities %s",
             ds.path, ds.num_users, ds.num_items, ds.manifest["num_train"], ds.manifest["num_valid"],
             ds.manifest["num_test"], ds.manifest["modalities"])

    t0 = time.perf_counter()
    device = device_for(cfg, ctx)
    engine = build_engine(cfg, ds, ctx)
    cleanup.callback(engine.close)      # sampler workers end with the run, however it ends
    n_params = engine.num_parameters()
    log.info("model: %d trainable parameters, device %s, %s, set-up %.2fs", n_params, device,
             f"{ctx.world_size} ranks ({ctx.backend})" if ctx else "1 process", time.perf_counter() - t0)
    sampler, gather = triple_sampler(ds, cfg)
    valid_eval, test_eval = make_evaluators(ds, cfg)
    if len(valid_eval.users) < len(test_eval.users) and cfg.valid_users:
        log.info("validation on a fixed sample of %d users (valid_users); test on all %d", len(valid_eval.users),
                 len(test_eval.users))
    if init_from is not None and latest is None:  # a resumed run's checkpoint already holds its warm start
        from lgmrec_dist.warmstart import warm_start
        log.info("warm start from %s: %s", init_from, warm_start(engine, ds, init_from))
    stopper = EarlyStopping(cfg.stopping_step)
    loop = _fresh_loop()
    best_emb = None  # the best-validation epoch's embeddings, kept for the one test ranking after the loop
    if latest is not None:
        state = ckpt.load(latest)
        engine.load_state_dict(state["engine"])
        stopper.load_state_dict(state["stopper"])
        loop = state["loop"]
        set_rng_state(state["rng"])
        log.info("resumed from %s (epoch %d, batch %d, step %d)", latest, loop["epoch"], loop["batch"], loop["step"])
    if main_rank:
        _trim_epoch_log(run_dir, loop["epoch"])

    def save(phase: int) -> None:
        ckpt.save({"engine": engine.state_dict(), "stopper": stopper.state_dict(), "loop": loop,
                   "rng": rng_state()}, loop["step"], phase)

    run_log = RunLog(run_dir if main_rank else None)
    n_batches = sampler.num_batches(cfg.train_batch_size)
    done = stopper.should_stop or (cfg.max_steps and loop["step"] >= cfg.max_steps)
    while not done and loop["epoch"] < cfg.epochs:
        epoch = loop["epoch"]
        engine.train()
        batches = EpochBatches(sampler, epoch, device, gather)
        t0 = time.perf_counter() - loop["epoch_elapsed"]
        bar = tqdm(range(loop["batch"], n_batches), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                   file=sys.stderr, mininterval=1.0, disable=not (main_rank and sys.stderr.isatty()))
        for b in bar:
            users, pos, neg = batches(b, cfg.train_batch_size)
            terms = engine.step(users, pos, neg, loop["step"])
            _check_finite(terms, loop["step"], ckpt)
            run_log.step(loop["step"], terms)
            loop["step"] += 1
            loop["batch"] = b + 1
            loop["epoch_steps"] += 1
            loop["epoch_samples"] += len(users)
            loop["epoch_sums"] = {k: loop["epoch_sums"].get(k, 0.0) + v for k, v in terms.items()}
            loop["epoch_elapsed"] = time.perf_counter() - t0
            bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
            if cfg.max_steps and loop["step"] >= cfg.max_steps:
                break
            if cfg.checkpoint_every_steps and loop["step"] % cfg.checkpoint_every_steps == 0 and b + 1 < n_batches:
                save(0)
            _fault_injection(loop["step"], ctx)
        bar.close()
        seconds, steps = time.perf_counter() - t0, max(loop["epoch_steps"], 1)
        means = {k: v / steps for k, v in loop["epoch_sums"].items()}
        loop["epoch_seconds"].append(seconds)
        loop["train_loss"].append(means.get("loss", 0.0))
        loop["epochs_run"] = epoch + 1

        emb = engine.embeddings()
        valid = engine.evaluate(valid_eval, emb)
        improved = stopper.update(epoch, valid[cfg.valid_metric])
        if improved:  # test metrics are only reported at the best-validation epoch (§2): ranked once, at the end
            loop["best_valid"], loop["best_test"], best_emb = valid, {}, emb
            if cfg.eval_gumbel_noise:  # every inference pass draws new noise: rank the test set with this one
                loop["best_test"] = engine.evaluate(test_eval, emb)
            ckpt.save_best(engine.model_payload(), epoch)
        log.info("epoch %d: loss %.4f (%d steps, %.2fs) valid %s %.4f%s", epoch, loop["train_loss"][-1],
                 loop["epoch_steps"], seconds, cfg.valid_metric, valid[cfg.valid_metric],
                 "  *best*" if improved else "")
        run_log.epoch({"epoch": epoch, "step": loop["step"], "train": means, "learning_rate": cfg.learning_rate,
                       "seconds": seconds, "seconds_per_step": seconds / steps,
                       "samples_per_second": loop["epoch_samples"] / max(seconds, 1e-9), "valid": valid,
                       "best": improved, "test": (loop["best_test"] or None) if improved else None})
        done = stopper.should_stop or bool(cfg.max_steps and loop["step"] >= cfg.max_steps)
        loop.update(epoch=epoch + 1, batch=0, epoch_sums={}, epoch_steps=0, epoch_samples=0, epoch_elapsed=0.0)
        if cfg.checkpoint_every_epoch:
            save(1)

    if stopper.best_epoch is not None and not loop["best_test"]:
        loop["best_test"] = _best_test_metrics(engine, test_eval, best_emb, ds, run_dir)
    metrics = {
        "best_epoch": stopper.best_epoch,
        "epochs_run": loop["epochs_run"],
        "steps": loop["step"],
        "seconds_per_epoch": float(np.mean(loop["epoch_seconds"])) if loop["epoch_seconds"] else 0.0,
        "seconds_per_step": float(sum(loop["epoch_seconds"]) / max(loop["step"], 1)),
        "train_loss": loop["train_loss"],
        "valid": loop["best_valid"],
        "test": loop["best_test"],
        "num_parameters": n_params,
        "world_size": ctx.world_size if ctx else 1,
        "config_digest": cfg.digest(),
        "dataset": str(ds.path),
    }
    if main_rank:
        atomic_write_json(run_dir / "metrics.json", metrics)
        table = summary_table(loop["best_valid"], loop["best_test"], cfg.topk)
        log.info("best epoch %s of %d; metrics at the best-validation epoch:\n%s", stopper.best_epoch,
                 loop["epochs_run"], table)
    run_log.finish(metrics)
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lgmrec train", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return guarded(run, args)


def run(args) -> int:
    """``lgmrec train``; its failures are reported by the command line's one error path (entry.guarded)."""
    from lgmrec_dist.distributed.group import close_process_group, init_process_group, launched_by_torchrun
    ctx = None
    try:
        cfg = load_config(args.config, args.set)
        if launched_by_torchrun():
            ctx = init_process_group(cfg.device)
        train(args.data, cfg, args.out, overwrite=args.overwrite, ctx=ctx, resume=True if args.resume else None,
              init_from=args.init_from)
        if ctx is not None:
            close_process_group()
    finally:
        if ctx is not None:      # after an error the other ranks may be gone: no barrier
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # run the imported module, not __main__: its TrainingError is the class the CLI's error path catches
    from lgmrec_dist import train as _train_module
    sys.exit(_train_module.main())
