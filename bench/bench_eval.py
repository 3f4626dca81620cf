"""Benchmark: the full-ranking top-K against the bare user × item matmul it is built on.

    .venv/bin/python bench/bench_eval.py                         # 4,096 users × 381,000 items × 64
    .venv/bin/python bench/bench_eval.py --users 1024 --items 131072 --threads 1

Side by side in one process, on random embeddings: (a) the matmul alone, tile by tile into one reused
buffer, users in the row chunks ``streaming_topk`` uses (the floor: every full ranking pays it);
``streaming_topk``'s tensor path (b) with the block pruning off (a full ``torch.topk`` per tile) and (c)
with it on; (d) its C heap kernel (the CPU default). Prints seconds, each as a multiple of (a), and whether
the top-K scores agree. Ranking every user of a catalogue scales these figures by users / --users.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lgmrec_dist.evaluation import ITEM_TILE, TILE_FLOATS, streaming_topk  # noqa: E402


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
    p.add_argument("--item-tile", type=int, default=ITEM_TILE)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    users = torch.randn(args.users, args.dim, generator=gen)
    items = torch.randn(args.items, args.dim, generator=gen)

    chunk = max(1, TILE_FLOATS // args.item_tile)
    buf = torch.empty(min(chunk, args.users) * args.item_tile)

    def matmul_only():
        for c0 in range(0, args.users, chunk):
            u = users[c0:c0 + chunk]
            for lo in range(0, args.items, args.item_tile):
                tile = items[lo:lo + args.item_tile]
                torch.mm(u, tile.T, out=buf[:len(u) * len(tile)].view(len(u), len(tile)))

    floor, _ = best_of(matmul_only, args.repeats)
    runs = {"top-K, full topk per tile": dict(kernel=False, prune_block=args.item_tile + 1),
            "top-K, block pruning": dict(kernel=False), "top-K, C heap (default)": dict(kernel=True)}
    timed = {name: best_of(lambda: streaming_topk(users, items, None, args.k, args.item_tile, **kw), args.repeats)
             for name, kw in runs.items()}
    print(f"{args.users} users x {args.items} items x {args.dim}, top-{args.k}, tile {args.item_tile}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':<28}{'seconds':>9}{'x matmul':>10}")
    for name, sec in (("matmul only", floor), *((name, sec) for name, (sec, _) in timed.items())):
        print(f"{name:<28}{sec:>9.3f}{sec / floor:>10.2f}")
    scores = [s for _, (s, _) in timed.values()]
    print(f"same top-K scores: {all(torch.equal(scores[0], s) for s in scores[1:])}")


if __name__ == "__main__":
    main()
