"""Train LGMRec on a prepared dataset and evaluate it with the MMRec protocol (LGMRec_SPEC.md §1.8-§2).

    python -m lgmrec_dist.train --data DIR --config FILE --out RUNDIR [--set key=value ...]
    lgmrec train ...   (same arguments)

Writes RUNDIR/metrics.json, RUNDIR/config.yaml (the resolved config) and RUNDIR/train.log.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.config import Config, ConfigError, load_config
from lgmrec_dist.dataset import TEST, TRAIN, VALID, DatasetError, PreparedDataset, atomic_write_json
from lgmrec_dist.evaluation import EarlyStopping, Evaluator
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model import LGMRec
from lgmrec_dist.observe import RunLog

log = logging.getLogger("lgmrec")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="prepared dataset directory (lgmrec import-mmrec / prep)")
    p.add_argument("--config", help="YAML config (configs/*.yaml); defaults are the official settings")
    p.add_argument("--out", required=True, help="run directory for metrics.json, config.yaml, train.log")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but torch sees no CUDA device")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def setup_logging(run_dir: Path) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    for handler in (logging.FileHandler(run_dir / "train.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.propagate = False


def make_evaluators(ds: PreparedDataset, cfg: Config) -> tuple[Evaluator, Evaluator]:
    tu, ti = ds.pairs(TRAIN)
    make = lambda label: Evaluator(ds.num_users, ds.num_items, tu, ti, *ds.pairs(label), ks=cfg.topk,  # noqa: E731
                                   batch_size=cfg.eval_batch_size, item_tile=cfg.eval_item_tile)
    return make(VALID), make(TEST)


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


class LocalEngine:
    """One process, the whole graph: the reference path (lgmrec_dist.model.LGMRec)."""

    def __init__(self, cfg: Config, ds: PreparedDataset, device: torch.device):
        tu, ti = ds.pairs(TRAIN)
        self.model = LGMRec(cfg, ds.num_users, ds.num_items, ds.manifest["modalities"]).to(device)
        self.model.attach(build_graph(ds.num_users, ds.num_items, tu, ti), ds.features)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.learning_rate)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    def train(self):
        self.model.train()

    def step(self, users, pos, neg, step: int) -> dict:
        terms = self.model.batch_loss(users, pos, neg, step)
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {k: v.item() for k, v in terms.items()}

    def embeddings(self):
        self.model.eval()
        return self.model.final_embeddings()

    def evaluate(self, evaluator: Evaluator, emb) -> dict:
        return evaluator.evaluate_metrics(*emb)


def train(data: str | Path, cfg: Config, out: str | Path, overwrite: bool = False, ctx=None) -> dict:
    """Train and evaluate; ``ctx`` (a distributed.group.Context) selects the sharded engine."""
    main_rank = ctx is None or ctx.is_main
    run_dir = Path(out)
    if (run_dir / "metrics.json").exists() and not overwrite:
        raise ConfigError(f"{run_dir} already holds a finished run (metrics.json); pass --overwrite to replace it")
    ds = PreparedDataset.load(data)
    if main_rank:
        run_dir.mkdir(parents=True, exist_ok=True)
        setup_logging(run_dir)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    else:
        log.setLevel(logging.WARNING)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    log.info("dataset %s: %d users, %d items, %d train / %d valid / %d test, modalities %s",
             ds.path, ds.num_users, ds.num_items, ds.manifest["num_train"], ds.manifest["num_valid"],
             ds.manifest["num_test"], ds.manifest["modalities"])

    t0 = time.perf_counter()
    if ctx is None:
        device = resolve_device(cfg)
        engine = LocalEngine(cfg, ds, device)
    else:
        from lgmrec_dist.distributed.engine import ShardedEngine
        device = ctx.device
        engine = ShardedEngine(cfg, ds, ctx)
    n_params = engine.num_parameters()
    log.info("model: %d trainable parameters, device %s, %s, set-up %.2fs", n_params, device,
             f"{ctx.world_size} ranks ({ctx.backend})" if ctx else "1 process", time.perf_counter() - t0)
    tu, ti = ds.pairs(TRAIN)
    sampler = TripleSampler(ds.num_items, tu, ti, cfg.seed)
    valid_eval, test_eval = make_evaluators(ds, cfg)
    stopper = EarlyStopping(cfg.stopping_step)

    run_log = RunLog(run_dir if main_rank else None)
    step, epoch_seconds, train_loss = 0, [], []
    best_valid, best_test, epochs_run = {}, {}, 0
    for epoch in range(cfg.epochs):
        engine.train()
        users, pos, neg = (torch.from_numpy(a).to(device) for a in sampler.epoch(epoch))
        n_batches = sampler.num_batches(cfg.train_batch_size)
        t0, sums, steps, samples = time.perf_counter(), {}, 0, 0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0, disable=not (main_rank and sys.stderr.isatty()))
        for b in bar:
            sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
            terms = engine.step(users[sl], pos[sl], neg[sl], step)
            run_log.step(step, terms)
            step, steps, samples = step + 1, steps + 1, samples + len(users[sl])
            sums = {k: sums.get(k, 0.0) + v for k, v in terms.items()}
            bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
            if cfg.max_steps and step >= cfg.max_steps:
                break
        bar.close()
        epoch_seconds.append(time.perf_counter() - t0)
        means = {k: v / max(steps, 1) for k, v in sums.items()}
        train_loss.append(means.get("loss", 0.0))
        epochs_run = epoch + 1

        emb = engine.embeddings()
        valid = engine.evaluate(valid_eval, emb)
        improved = stopper.update(epoch, valid[cfg.valid_metric])
        if improved:  # test metrics are only reported at the best-validation epoch (§2)
            best_valid, best_test = valid, engine.evaluate(test_eval, emb)
        log.info("epoch %d: loss %.4f (%d steps, %.2fs) valid %s %.4f%s", epoch, train_loss[-1], steps,
                 epoch_seconds[-1], cfg.valid_metric, valid[cfg.valid_metric], "  *best*" if improved else "")
        run_log.epoch({"epoch": epoch, "step": step, "train": means, "learning_rate": cfg.learning_rate,
                       "seconds": epoch_seconds[-1], "seconds_per_step": epoch_seconds[-1] / max(steps, 1),
                       "samples_per_second": samples / max(epoch_seconds[-1], 1e-9), "valid": valid,
                       "best": improved, "test": best_test if improved else None})
        if stopper.should_stop or (cfg.max_steps and step >= cfg.max_steps):
            break

    metrics = {
        "best_epoch": stopper.best_epoch,
        "epochs_run": epochs_run,
        "steps": step,
        "seconds_per_epoch": float(np.mean(epoch_seconds)),
        "seconds_per_step": float(sum(epoch_seconds) / max(step, 1)),
        "train_loss": train_loss,
        "valid": best_valid,
        "test": best_test,
        "num_parameters": n_params,
        "world_size": ctx.world_size if ctx else 1,
        "config_digest": cfg.digest(),
        "dataset": str(ds.path),
    }
    if main_rank:
        atomic_write_json(run_dir / "metrics.json", metrics)
        table = summary_table(best_valid, best_test, cfg.topk)
        log.info("best epoch %d of %d; metrics at the best-validation epoch:\n%s", stopper.best_epoch,
                 epochs_run, table)
    run_log.finish(metrics)
    return metrics


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="lgmrec train", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def run(args) -> int:
    from lgmrec_dist.distributed.group import LaunchError, init_process_group, launched_by_torchrun
    ctx = None
    try:
        cfg = load_config(args.config, args.set)
        if launched_by_torchrun():
            ctx = init_process_group(cfg.device)
        train(args.data, cfg, args.out, overwrite=args.overwrite, ctx=ctx)
    except (ConfigError, DatasetError, LaunchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
