"""Benchmark: step time, bytes per step and peak memory of the sampled (large-catalogue) mode against the
exact mode, on synthetic catalogues at 1x and 10x users and items; and quality of both (see
docs/sampled.md).

    .venv/bin/python bench/bench_sampled.py --paired          # sampled and exact at 1x and 10x, + paired ratio
    .venv/bin/python bench/bench_sampled.py --scales 1 --modes sampled --steps 20
    .venv/bin/python bench/bench_sampled.py --set fanouts=[10,10] --set hyper_refresh_steps=100
    .venv/bin/python bench/bench_sampled.py --quality --seeds 1 2 3   # test Recall@20, exact vs sampled
    .venv/bin/python bench/bench_sampled.py --epoch-10m               # one epoch, 10M interactions
    .venv/bin/python bench/bench_sampled.py --ranks 2 --scales 1 --set shard_tables=true   # 2 gloo ranks

Scale 1 = an MMRec-Baby-sized catalogue (19,445 users, 7,050 items, 160,792 interactions, image 4096-d and
text 384-d features; ``bench_train.dataset_for``); scale s multiplies users, items and interactions by s.
Every (mode, scale) runs in its own process, so peak RSS is that configuration's. ``configs/baby.yaml``
(batch 2,048, d = 64, A = 4, L = 2, K = 2, H = 1) plus, for the sampled mode, ``SAMPLED`` below (and any
``--set``). Reported per configuration: set-up time; the median step time over the timed steps that ran
no full pass (the first step, with start-up effects, is reported apart); the time of a hyperedge-message
refresh (a full pass, timed on its own after the steps); the AMORTISED step time, everything a step pays
with refreshes included: median + refresh / interval, the interval being the engine's own (r stretched to
the epoch by ``hyper_refreshes_per_epoch``, docs/sampled.md); the time spent waiting for the sampler; bytes per step;
peak RSS; the 1-minute load average before and after (other jobs on a shared 2-core box inflate absolute
times). ``--paired`` also steps the sampled engines of all scales in turn inside one process, so that
their ratio is measured under the same load; it reports the amortised step per scale side by side and
the 10x / 1x (last / first scale) amortised ratio. Runs get ``OMP_WAIT_POLICY=PASSIVE`` (``--omp-active`` not).

``--quality`` trains both modes on a planted-structure catalogue (``QUALITY_DATA``; settings
``QUALITY_COMMON``, a fixed epoch budget, test metrics at the best-validation epoch) for each seed.
Runs on CUDA unchanged when torch sees a GPU (sampling stays on the CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import dataset_for  # noqa: E402

# the shipped settings: ``mode: sampled`` with its defaults (config.SAMPLED_DEFAULTS) and what
# configs/large.yaml adds for the step
SAMPLED = ["mode=sampled", "sampler_workers=1", "user_feature_table=false"]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# An epoch of a 10M-interaction catalogue: Baby's user/item/interaction ratios, scaled to 10M
# interactions; image 512-d and text 384-d features, the widths `lgmrec extract` gives with resnet18 and MiniLM.
EPOCH_10M = dict(num_users=1_210_000, num_items=440_000, num_interactions=10_000_000,
                 modalities={"image": 512, "text": 384}, seed=10)
EPOCH_10M_SET = ["user_feature_table=false", "feature_dtype=bfloat16"]   # the memory settings at this size


def dataset_10m(out_root: Path) -> Path:
    from data_prep.synthetic import make_prepared_synthetic
    path = out_root / "synthetic_10m"
    if not (path / "manifest.json").exists():
        make_prepared_synthetic(path, overwrite=True, **EPOCH_10M)
    return path


def dataset_at(scale: int, out_root: Path) -> Path:
    """Scale s of bench_train's catalogues; scale 0 = the 10M-interaction catalogue."""
    return dataset_10m(out_root) if scale == 0 else dataset_for(scale, out_root)


def run_one(mode: str, scale: int, steps: int, overrides: list[str], out_root: Path, eval_users: int = 0) -> dict:
    from lgmrec_dist.batches import TripleSampler
    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import TRAIN, PreparedDataset
    from lgmrec_dist.local import LocalEngine
    from lgmrec_dist.sampled import SampledEngine

    load0 = os.getloadavg()[0]
    ds = PreparedDataset.load(dataset_at(scale, out_root), verify=False)
    extra = (SAMPLED + overrides) if mode == "sampled" else overrides
    cfg = load_config(ROOT / "configs" / "baby.yaml", extra)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.perf_counter()
    engine = (SampledEngine if mode == "sampled" else LocalEngine)(cfg, ds, device)
    setup_s = time.perf_counter() - t0
    tu, ti = ds.pairs(TRAIN)
    triples = TripleSampler(ds.num_items, tu, ti, cfg.seed)
    users, pos, neg = (torch.from_numpy(a) for a in triples.epoch(0))
    n_batches = triples.num_batches(cfg.train_batch_size)
    times, refresh, waits, stats = [], [], [], []
    engine.train()
    t_steps = time.perf_counter()
    for b in range(min(steps, n_batches)):
        if b and b % 500 == 0:
            print(f"step {b}/{min(steps, n_batches)}, {time.perf_counter() - t_steps:.0f} s", file=sys.stderr,
                  flush=True)
        sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step(users[sl].to(device), pos[sl].to(device), neg[sl].to(device), b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        last = getattr(engine, "last_stats", {})
        if b == 0:
            first = dt                            # start-up effects (worker fork, first allocation)
        elif mode == "sampled" and last["bytes"]["full_pass"] and cfg.hyper_refresh_steps:
            refresh.append(dt)
        else:
            times.append(dt)
        if last:
            waits.append(last["sample_wait_s"])
            stats.append(last)
    steps_wall_s = time.perf_counter() - t_steps
    refresh_s = None
    if mode == "sampled" and cfg.use_ghe:         # a message refresh, timed on its own after warm-up
        reps = []
        for _ in range(2):
            t = time.perf_counter()
            engine.sampled.full_messages(0)
            reps.append(time.perf_counter() - t)
        refresh_s = min(reps)
    evaluation = {}
    if eval_users:                                # inference + validation of a sample of users, timed
        from lgmrec_dist.train import make_evaluators
        valid_eval, _ = make_evaluators(ds, dataclasses.replace(cfg, valid_users=eval_users))
        t = time.perf_counter()
        emb = engine.embeddings()
        evaluation["inference_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        valid = engine.evaluate(valid_eval, emb)
        evaluation.update(eval_users=len(valid_eval.users), eval_s=round(time.perf_counter() - t, 1),
                          valid_recall20=round(valid["recall@20"], 4))
    if hasattr(engine, "close"):
        engine.close()
    step_s = statistics.median(times) if times else None
    r = engine.sampled.refresh_interval if mode == "sampled" else 0
    row = {"mode": mode, "scale": scale, "users": ds.num_users, "items": ds.num_items,
           "train_pairs": len(tu), "device": str(device), "threads": torch.get_num_threads(),
           "setup_s": round(setup_s, 2), "steps_timed": len(times) + len(refresh),
           "seconds_per_step": step_s and round(step_s, 4),
           "first_step_s": round(first, 3), "refresh_s": refresh_s and round(refresh_s, 3),
           "steps_per_epoch": n_batches, "steps_wall_s": round(steps_wall_s, 1),
           "peak_rss_gb": round(peak_rss_gb(), 2),
           "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), **evaluation}
    if mode == "sampled":
        row["amortised_step_s"] = round(step_s + refresh_s / r, 4) if refresh_s and r else step_s
        row["refresh_interval"] = r
        row["sample_wait_s"] = round(statistics.median(waits[1:] or waits), 4)
        row["refresh_steps_timed"] = len(refresh)
        keep = stats[1:] or stats
        row["input_nodes"] = int(statistics.mean(s["input_nodes"] for s in keep))
        row["block_edges"] = int(statistics.mean(s["edges"] for s in keep))
        row["bytes_per_step_mb"] = {k: round(statistics.mean(s["bytes"][k] for s in keep) / 1e6, 2)
                                    for k in ("embeddings", "features", "graph", "dense")}
        row["config"] = extra
    else:
        row["seconds_per_step"] = step_s and round(step_s, 4)
        d = cfg.embedding_size
        row["bytes_per_step_mb"] = {"embeddings": round(4 * d * 8 * (ds.num_users + ds.num_items) / 1e6, 2)}
    row["epoch_estimate_s"] = round((row.get("amortised_step_s") or row["seconds_per_step"]) * n_batches, 1)
    return row


# ---------------------------------------------------------------------------------------------- P ranks
def rank_worker(scale: int, steps: int, overrides: list[str], out_root: Path) -> None:
    """Under torchrun: the sampled engine on P ranks (gloo on CPU); each rank writes its figures."""
    from lgmrec_dist.batches import TripleSampler
    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import TRAIN, PreparedDataset
    from lgmrec_dist.distributed.group import close_process_group, init_process_group
    from lgmrec_dist.sampled import SampledEngine

    ctx = init_process_group()
    ds = PreparedDataset.load(dataset_at(scale, out_root), verify=False)
    cfg = load_config(ROOT / "configs" / "baby.yaml", SAMPLED + overrides)
    t0 = time.perf_counter()
    engine = SampledEngine(cfg, ds, ctx.device, ctx)
    setup_s = time.perf_counter() - t0
    held = engine.sampled.memory_bytes()
    tu, ti = ds.pairs(TRAIN)
    users, pos, neg = (torch.from_numpy(a) for a in TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0))
    times, sent = [], []
    for b in range(steps):
        sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
        t = time.perf_counter()
        engine.step(users[sl], pos[sl], neg[sl], b)
        if b and not engine.last_stats["bytes"]["full_pass"]:
            times.append(time.perf_counter() - t)
        sent.append(engine.last_stats["bytes"]["sent_to_other_ranks"])
    refresh = []
    for _ in range(2):                            # a message refresh on its own (every rank takes part)
        t = time.perf_counter()
        engine.sampled.full_messages(0)
        refresh.append(time.perf_counter() - t)
    engine.close()
    row = {"rank": ctx.rank, "world": ctx.world_size, "scale": scale, "setup_s": round(setup_s, 1),
           "seconds_per_step": round(statistics.median(times), 4) if times else None,
           "refresh_s": round(min(refresh), 3),
           "sent_mb_per_step": round(statistics.median(sent[1:] or sent) / 1e6, 2),
           "held_gb": {k: round(v / 1e9, 3) for k, v in held.items()}, "peak_rss_gb": round(peak_rss_gb(), 2),
           "config": SAMPLED + overrides}
    (out_root / f"ranks_{ctx.rank}.json").write_text(json.dumps(row))
    close_process_group()


def child(args, argv: list[str], launcher: list[str] = ()) -> tuple[list[str], dict]:
    """Command line and environment of a child run of this script: ``argv`` plus the --set overrides,
    with OMP_WAIT_POLICY=PASSIVE unless --omp-active."""
    cmd = [sys.executable, *launcher, __file__, *argv]
    for kv in args.set:
        cmd += ["--set", kv]
    return cmd, {**os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if args.omp_passive else {})}


def ranks(args, out_root: Path) -> None:
    """``--ranks P``: torchrun P processes of :func:`rank_worker` on this machine; print each rank's row."""
    dataset_at(args.scales[0], out_root)         # made here, before the ranks start
    cmd, env = child(args, ["--rank-worker", "--scales", str(args.scales[0]), "--steps", str(args.steps),
                            "--out", str(out_root)],
                     launcher=["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"])
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.ranks))
    if subprocess.run(cmd, env=env).returncode:
        sys.exit("the P-rank run failed")
    for r in range(args.ranks):
        print((out_root / f"ranks_{r}.json").read_text())


# ---------------------------------------------------------------------------------------------- paired
def paired(scales: list[int], steps: int, overrides: list[str], out_root: Path) -> dict:
    """Sampled engines of all scales in one process, stepping in turn: the step-time ratio of two scales is
    then measured under the same machine load (other jobs on a shared box move absolute times a lot)."""
    from lgmrec_dist.batches import TripleSampler
    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import TRAIN, PreparedDataset
    from lgmrec_dist.sampled import SampledEngine

    runs = {}
    for scale in scales:
        ds = PreparedDataset.load(dataset_for(scale, out_root), verify=False)
        cfg = load_config(ROOT / "configs" / "baby.yaml", SAMPLED + overrides)
        tu, ti = ds.pairs(TRAIN)
        triples = TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        runs[scale] = (SampledEngine(cfg, ds, device), [torch.from_numpy(a).to(device) for a in triples],
                       cfg.train_batch_size)
    times = {scale: [] for scale in scales}
    steps = min(steps, *(-(-len(u) // size) for _, (u, *_), size in runs.values()))   # within one epoch
    for b in range(steps):
        for scale, (engine, (users, pos, neg), size) in runs.items():
            sl = slice(b * size, (b + 1) * size)
            t = time.perf_counter()
            engine.step(users[sl], pos[sl], neg[sl], b)
            if users.is_cuda:
                torch.cuda.synchronize()
            if b and not engine.last_stats["bytes"]["full_pass"]:   # the first step and refreshes apart
                times[scale].append(time.perf_counter() - t)
    refresh = {scale: [] for scale in scales}
    for _ in range(2):                            # a full message refresh of each scale, in turn
        for scale, (engine, *_) in runs.items():
            t = time.perf_counter()
            engine.sampled.full_messages(0)
            refresh[scale].append(time.perf_counter() - t)
    interval = {scale: engine.sampled.refresh_interval for scale, (engine, *_) in runs.items()}
    for engine, *_ in runs.values():
        engine.close()
    med = {scale: statistics.median(t) for scale, t in times.items()}
    amortised = {s: med[s] + (min(refresh[s]) / interval[s] if interval[s] else 0.0) for s in scales}
    base, top = scales[0], scales[-1]
    return {"paired_steps": steps, "median_step_s": {s: round(v, 4) for s, v in med.items()},
            "refresh_s": {s: round(min(v), 3) for s, v in refresh.items()}, "refresh_interval": interval,
            "amortised_step_s": {s: round(v, 4) for s, v in amortised.items()},
            f"amortised_ratio_{top}x_{base}x": round(amortised[top] / amortised[base], 3),
            "ratio_to_first": {s: round(med[s] / med[base], 3) for s in scales},
            "median_pairwise_ratio": {s: round(statistics.median(a / b for a, b in zip(times[s], times[base])), 3)
                                      for s in scales},
            "config": SAMPLED + overrides, "load": round(os.getloadavg()[0], 2),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}


# ---------------------------------------------------------------------------------------------- quality
QUALITY_DATA = dict(num_users=8000, num_items=4000, num_interactions=80_000, modalities={"image": 128, "text": 64},
                    num_clusters=1000)
QUALITY_COMMON = ["epochs=50", "stopping_step=50", "train_batch_size=1024", "learning_rate=0.001",
                  "embedding_size=64", "eval_batch_size=2048"]


def planted_dataset(out_root: Path) -> Path:
    from data_prep.synthetic import make_prepared_synthetic
    path = out_root / "planted_quality"
    if not (path / "manifest.json").exists():
        make_prepared_synthetic(path, seed=7, overwrite=True, **QUALITY_DATA)
    return path


def quality_one(mode: str, seed: int, overrides: list[str], out_root: Path) -> dict:
    from lgmrec_dist.config import load_config
    from lgmrec_dist.train import train
    data = planted_dataset(out_root)
    extra = QUALITY_COMMON + [f"seed={seed}"] + (SAMPLED if mode == "sampled" else []) + overrides
    cfg = load_config(ROOT / "configs" / "baby.yaml", extra)
    t0 = time.perf_counter()
    metrics = train(data, cfg, out_root / "quality_runs" / f"{mode}_seed{seed}", overwrite=True, resume=False)
    return {"mode": mode, "seed": seed, "test_recall@20": metrics["test"]["recall@20"],
            "test_ndcg@20": metrics["test"]["ndcg@20"], "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "seconds_per_step": round(metrics["seconds_per_step"], 4),
            "wall_s": round(time.perf_counter() - t0, 1), "config": extra}


def quality(args, out_root: Path) -> None:
    rows = []
    planted_dataset(out_root)
    for seed in args.seeds:
        for mode in ("exact", "sampled"):
            cmd, env = child(args, ["--quality-one", mode, str(seed), "--out", str(out_root)])
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode:
                sys.exit(f"quality {mode} seed {seed} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| seed | exact recall@20 | sampled recall@20 | exact ndcg@20 | sampled ndcg@20 |\n|---|---|---|---|---|")
    for seed in args.seeds:
        e, s_ = (next(r for r in rows if r["mode"] == m and r["seed"] == seed) for m in ("exact", "sampled"))
        print(f"| {seed} | {e['test_recall@20']} | {s_['test_recall@20']} | {e['test_ndcg@20']} | {s_['test_ndcg@20']} |")
    for metric in ("test_recall@20", "test_ndcg@20"):
        mean = {m: statistics.mean(r[metric] for r in rows if r["mode"] == m) for m in ("exact", "sampled")}
        print(f"mean {metric}: exact {mean['exact']:.4f}, sampled {mean['sampled']:.4f}, "
              f"relative difference {(mean['sampled'] - mean['exact']) / mean['exact'] * 100:+.2f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    p.add_argument("--modes", nargs="+", default=["sampled", "exact"], choices=["sampled", "exact"])
    p.add_argument("--steps", type=int, default=40, help="sampled steps to time per configuration")
    p.add_argument("--exact-steps", type=int, default=6, help="exact steps to time per configuration")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (all runs)")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--omp-active", dest="omp_passive", action="store_false",
                   help="leave OpenMP's default (spinning) wait policy; by default each run gets "
                        "OMP_WAIT_POLICY=PASSIVE, without which a shared, oversubscribed CPU box slows every "
                        "configuration several-fold (docs/sampled.md)")
    p.add_argument("--quality", action="store_true",
                   help="instead of timing: train exact and sampled mode to early stopping on a planted-structure "
                        "catalogue and compare test Recall@20 (QUALITY_DATA, QUALITY_COMMON)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--paired", action="store_true",
                   help="also time the sampled mode of all scales in ONE process, stepping in turn (robust ratio)")
    p.add_argument("--epoch-10m", action="store_true",
                   help="instead: one whole training epoch of the sampled mode on a 10M-interaction synthetic "
                        "catalogue (EPOCH_10M, made under --out on first use), evaluation not included")
    p.add_argument("--ranks", type=int, default=0,
                   help="instead: the sampled mode on this many gloo ranks (torchrun) at the first --scales value "
                        "(0 = the 10M catalogue), --steps steps; per-rank held bytes, peak RSS, bytes sent")
    p.add_argument("--eval-users", type=int, default=0,
                   help="also time inference and the validation of this many sampled users (valid_users)")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--quality-one", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--paired-one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    if args.rank_worker:
        rank_worker(args.scales[0], args.steps, args.set, out_root)
        return
    if args.ranks:
        ranks(args, out_root)
        return
    if args.quality_one is not None:
        print(json.dumps(quality_one(args.quality_one[0], int(args.quality_one[1]), args.set, out_root)))
        return
    if args.quality:
        quality(args, out_root)
        return
    if args.paired_one:
        print(json.dumps(paired(args.scales, args.steps, args.set, out_root)))
        return
    if args.one is not None:
        mode, scale = args.one[0], int(args.one[1])
        steps = args.steps if mode == "sampled" else args.exact_steps
        print(json.dumps(run_one(mode, scale, steps, args.set, out_root, args.eval_users)))
        return
    if args.epoch_10m:   # scale 0 = the 10M catalogue; every step of its epoch, in its own process
        dataset_10m(out_root)
        args.modes, args.scales, args.steps, args.set = ["sampled"], [0], 10**9, EPOCH_10M_SET + args.set
    rows = []
    for mode in args.modes:
        for scale in args.scales:
            cmd, env = child(args, ["--one", mode, str(scale), "--steps", str(args.steps), "--exact-steps",
                                    str(args.exact_steps), "--out", str(out_root), "--eval-users", str(args.eval_users)])
            res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)   # progress on stderr
            if res.returncode:
                sys.exit(f"{mode} x{scale} failed (exit {res.returncode})")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    cols = ["mode", "scale", "users", "items", "seconds_per_step", "refresh_s", "refresh_interval", "amortised_step_s",
            "sample_wait_s", "epoch_estimate_s", "steps_wall_s", "peak_rss_gb", "load_before", "load_after"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    if args.paired:
        cmd, env = child(args, ["--paired-one", "--scales", *map(str, args.scales), "--steps", str(args.steps),
                                "--out", str(out_root)])
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            sys.exit(f"paired run failed:\n{res.stderr[-3000:]}")
        line = res.stdout.strip().splitlines()[-1]
        print("paired (one process, scales stepping in turn):", line)
        got = json.loads(line)
        base, top = args.scales[0], args.scales[-1]
        print(f"sampled, paired: amortised step {got['amortised_step_s'][str(base)]} s at {base}x, "
              f"{got['amortised_step_s'][str(top)]} s at {top}x; ratio {top}x / {base}x = "
              f"{got[f'amortised_ratio_{top}x_{base}x']} (refreshes included)")
    for mode in args.modes:
        by = {r["scale"]: r for r in rows if r["mode"] == mode}
        if 1 in by and 10 in by and by[1]["seconds_per_step"]:
            key = "amortised_step_s" if mode == "sampled" else "seconds_per_step"
            print(f"{mode}: 10x / 1x step time = {by[10][key] / by[1][key]:.2f}"
                  f" (median step without a full pass: {by[10]['seconds_per_step'] / by[1]['seconds_per_step']:.2f})")


if __name__ == "__main__":
    main()
