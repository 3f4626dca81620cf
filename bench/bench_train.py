"""Benchmark: seconds per epoch and peak RSS of single-process LGMRec training on synthetic catalogues.

    .venv/bin/python bench/bench_train.py                 # Baby-sized (1x) and 10x, official features
    .venv/bin/python bench/bench_train.py --scales 1 --max-steps 20

Scale 1 = an MMRec-Baby-sized catalogue (19,445 users, 7,050 items, 160,792 interactions, image 4096-d
and text 384-d features); scale s multiplies users, items and interactions by s. Each scale runs in its
own process (peak RSS is per process). Side by side in the same process, the direct spec form
(`lgmrec_dist.model.reference`: one full-graph forward per batch, as the official code does) is timed
for a few steps, so the speed-up is a ratio measured on the same machine at the same moment.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BABY = dict(num_users=19_445, num_items=7_050, num_interactions=160_792)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def dataset_for(scale: int, out_root: Path) -> Path:
    from data_prep.synthetic import make_prepared_synthetic
    path = out_root / f"synthetic_x{scale}"
    if not (path / "manifest.json").exists():
        make_prepared_synthetic(path, num_users=BABY["num_users"] * scale, num_items=BABY["num_items"] * scale,
                                num_interactions=BABY["num_interactions"] * scale,
                                modalities={"image": 4096, "text": 384}, seed=scale, overwrite=True)
    return path


def run_one(scale: int, max_steps: int, reference_steps: int, out_root: Path) -> dict:
    from lgmrec_dist.batches import TripleSampler
    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import TRAIN, PreparedDataset, features_tensor
    from lgmrec_dist.graph import build_graph
    from lgmrec_dist.model import LGMRec, model_params
    from lgmrec_dist.model.reference import reference_loss
    from lgmrec_dist.train import make_evaluators

    path = dataset_for(scale, out_root)
    ds = PreparedDataset.load(path)
    cfg = load_config(ROOT / "configs" / "baby.yaml")
    torch.manual_seed(cfg.seed)
    tu, ti = ds.pairs(TRAIN)
    t0 = time.perf_counter()
    graph = build_graph(ds.num_users, ds.num_items, tu, ti)
    model = LGMRec(model_params(cfg), ds.num_users, ds.num_items, ds.manifest["modalities"])
    model.attach(graph, {m: features_tensor(x) for m, x in ds.features.items()})
    setup_s = time.perf_counter() - t0
    sampler = TripleSampler(ds.num_items, tu, ti, cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    users, pos, neg = (torch.from_numpy(a) for a in sampler.epoch(0))
    n_batches = sampler.num_batches(cfg.train_batch_size)
    steps = min(n_batches, max_steps) if max_steps else n_batches

    def batch(b):
        sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
        return users[sl], pos[sl], neg[sl]

    t0 = time.perf_counter()
    for b in range(steps):
        loss = model.batch_loss(*batch(b), step=b)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    fast_step = (time.perf_counter() - t0) / steps
    fast_rss = peak_rss_gb()

    t0 = time.perf_counter()
    model.eval()
    valid_eval, _ = make_evaluators(ds, cfg)
    metrics = valid_eval.evaluate_metrics(*model.final_embeddings())
    eval_s = time.perf_counter() - t0
    model.train()

    ref_step = None
    if reference_steps:
        t0 = time.perf_counter()
        for b in range(reference_steps):
            loss = reference_loss(model, *batch(b), step=b)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
        ref_step = (time.perf_counter() - t0) / reference_steps
    return {
        "scale": scale, "users": ds.num_users, "items": ds.num_items, "interactions": ds.manifest["num_interactions"],
        "threads": torch.get_num_threads(), "setup_s": round(setup_s, 2), "steps_timed": steps,
        "steps_per_epoch": n_batches, "seconds_per_step": round(fast_step, 4),
        "seconds_per_epoch": round(fast_step * n_batches, 2), "epoch_measured": steps == n_batches,
        "eval_valid_s": round(eval_s, 2), "valid_recall@20": metrics["recall@20"],
        "peak_rss_gb_train": round(fast_rss, 2), "reference_seconds_per_step": ref_step and round(ref_step, 4),
        "speedup_vs_reference": ref_step and round(ref_step / fast_step, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    p.add_argument("--max-steps", type=int, default=0, help="time only this many steps (0 = a whole epoch)")
    p.add_argument("--reference-steps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.max_steps, args.reference_steps, out_root)))
        return
    rows = []
    for scale in args.scales:
        cmd = [sys.executable, __file__, "--one", str(scale), "--max-steps", str(args.max_steps),
               "--reference-steps", str(args.reference_steps), "--out", str(out_root)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"scale {scale} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["scale", "users", "items", "interactions", "seconds_per_step", "seconds_per_epoch", "epoch_measured",
            "eval_valid_s", "peak_rss_gb", "reference_seconds_per_step", "speedup_vs_reference"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
