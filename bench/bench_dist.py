"""Benchmark of the exact distributed path: per-rank step time, peak memory, state and bytes sent.

    .venv/bin/python bench/bench_dist.py                       # P = 1 and 2 on this CPU (gloo)
    .venv/bin/python bench/bench_dist.py --nprocs 1 2 4 --device cuda   # GPU machine: NCCL, 1 GPU per rank

Uses the Baby-sized synthetic catalogue of bench/bench_train.py (19,445 users, 7,050 items, 160,792
interactions; image 4096-d, text 384-d) and configs/baby.yaml. Each P runs under torchrun; on CPU the
machine's cores are split evenly between ranks (torch threads = cores // P), so P = 2 on the 2-core box
shows communication cost and memory division, not a speed-up. Every rank prints one JSON line;
the driver prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def state_bytes(model) -> dict:
    """Bytes a process' model holds for graph, embeddings (with Adam's two moments) and features, its halo rows
    and its nodes (a rank's share with sharded rows, everything in one process)."""
    from lgmrec_dist.graph import graph_bytes
    tbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    return {"graph": graph_bytes(model.graph),
            "embeddings+adam": 3 * (tbytes(model.user_embedding) + tbytes(model.item_embedding)),
            "features": sum(tbytes(x) for x in model.features.values()),
            "mge_inputs": sum(tbytes(y) for y in model.mge_y.values()),
            "halo_rows": getattr(model.graph, "num_halo", 0), "owned_nodes": len(model.user_ids) + len(model.item_ids)}


def worker(args) -> None:
    import torch

    from lgmrec_dist.batches import TripleSampler
    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import TRAIN, PreparedDataset
    from lgmrec_dist.distributed.exchange import CommStats
    from lgmrec_dist.distributed.group import close_process_group, init_process_group
    from lgmrec_dist.engines import build_engine

    ctx = init_process_group(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // ctx.world_size))
    ds = PreparedDataset.load(args.data)
    cfg = load_config(ROOT / "configs" / "baby.yaml", {"device": args.device})
    t0 = time.perf_counter()
    eng = build_engine(cfg, ds, ctx)
    setup = time.perf_counter() - t0
    tu, ti = ds.pairs(TRAIN)
    users, pos, neg = (torch.from_numpy(a).to(ctx.device) for a in TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0))
    bs = cfg.train_batch_size

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    for b in range(args.warmup):
        eng.step(users[b * bs:(b + 1) * bs], pos[b * bs:(b + 1) * bs], neg[b * bs:(b + 1) * bs], b)
    sync()
    CommStats.take()
    t0 = time.perf_counter()
    for b in range(args.warmup, args.warmup + args.steps):
        eng.step(users[b * bs:(b + 1) * bs], pos[b * bs:(b + 1) * bs], neg[b * bs:(b + 1) * bs], b)
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    sent = CommStats.take() / args.steps
    world = ctx.world_size
    state = state_bytes(eng.model)
    row = {"P": world, "rank": ctx.rank, "threads": torch.get_num_threads(), "setup_s": round(setup, 2),
           "seconds_per_step": round(step_s, 4),
           "sent_MB_per_step": round(sent / 1e6, 2),   # CommStats: payloads, mirrors, ids, DDP's all-reduce
           "peak_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "state_MB": {k: (round(v / 1e6, 1) if k not in ("halo_rows", "owned_nodes") else v) for k, v in state.items()}}
    if ctx.device.type == "cuda":
        row["peak_cuda_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("BENCH " + json.dumps(row), flush=True)
    close_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--data", help="prepared dataset (default: the Baby-sized synthetic one, made if missing)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.data:
        from bench.bench_train import dataset_for
        args.data = str(dataset_for(1, ROOT / "bench" / "out"))
    rows = []
    for n in args.nprocs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", __file__,
               "--worker", "--data", args.data, "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.exit(f"P={n} failed:\n{res.stderr[-3000:]}")
        # the ranks share one stdout: their lines can interleave, so decode each "BENCH " record where it starts
        decoder = json.JSONDecoder()
        for part in res.stdout.split("BENCH ")[1:]:
            row, _ = decoder.raw_decode(part)
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["P", "rank", "threads", "seconds_per_step", "sent_MB_per_step", "peak_rss_GB"]
    print("\n| " + " | ".join(cols + ["graph MB", "emb+adam MB", "features MB", "mge_inputs MB", "halo rows"]) + " |")
    print("|" + "---|" * (len(cols) + 5))
    for r in sorted(rows, key=lambda r: (r["P"], r["rank"])):
        s = r["state_MB"]
        print("| " + " | ".join(str(r[c]) for c in cols) + f" | {s['graph']} | {s['embeddings+adam']} | "
              f"{s['features']} | {s['mge_inputs']} | {s['halo_rows']} |")


if __name__ == "__main__":
    main()
