"""Benchmark: the full-ranking top-K against the bare user × item matmul it is built on.

    .venv/bin/python bench/bench_eval.py                         # 4,096 users × 381,000 items × 64
    .venv/bin/python bench/bench_eval.py --users 1024 --items 131072 --threads 1

Side by side in one process, on random embeddings: (a) the matmul alone, tile by tile (the floor: every
full ranking pays it), (b) ``streaming_topk`` with the block pruning off (a full ``torch.topk`` per tile)
and (c) with it on (the default). Prints seconds, each as a multiple of (a), and whether (b) and (c)
agree. Ranking every user of a catalogue scales these figures by users / --users.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lgmrec_dist.evaluation import streaming_topk  # noqa: E402


def best_of(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=4096)
    p.add_argument("--items", type=int, default=381_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--item-tile", type=int, default=65536)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(args.users, args.dim, generator=gen)
    items = torch.randn(args.items, args.dim, generator=gen)

    def matmul_only():
        for lo in range(0, args.items, args.item_tile):
            users @ items[lo:lo + args.item_tile].T

    floor, _ = best_of(matmul_only, args.repeats)
    plain, (plain_s, _) = best_of(lambda: streaming_topk(users, items, None, args.k, args.item_tile,
                                                         prune_block=args.item_tile + 1), args.repeats)
    pruned, (pruned_s, _) = best_of(lambda: streaming_topk(users, items, None, args.k, args.item_tile),
                                    args.repeats)
    print(f"{args.users} users x {args.items} items x {args.dim}, top-{args.k}, tile {args.item_tile}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<28}{'seconds':>9}{'x matmul':>10}")
    for name, sec in (("matmul only", floor), ("top-K, full topk per tile", plain), ("top-K, block pruning", pruned)):
        print(f"{name:<28}{sec:>9.3f}{sec / floor:>10.2f}")
    print(f"same top-K scores: {torch.equal(plain_s, pruned_s)}")


if __name__ == "__main__":
    main()
