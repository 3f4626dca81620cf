"""Benchmark of what follows training (docs/serving.md): the HTTP service's latency and throughput, exact
scoring against the ANN indexes and their recall, fold-in quality, and warm-start retraining.

    .venv/bin/python bench/bench_serve.py --part latency [--items 100000 1000000] [--requests 200]
    .venv/bin/python bench/bench_serve.py --part foldin
    .venv/bin/python bench/bench_serve.py --part warmstart

latency: a child process serves `GET /recommend?user=U&k=20` (api.create_app on uvicorn, 127.0.0.1) over
random *clustered* embeddings of the default model width (d = 64; 1,024 Gaussian centres, items and
users = centre + noise; 10,000 users with 20 training items each, excluded from their answers) — not a
trained model. Exact scoring's cost depends on the sizes only; an index's recall and speed depend on
the distribution as well (clustered vectors suit IVF; trained embeddings: `lgmrec export --ann`). The parent sends requests from 1, 8 and
32 client threads over keep-alive connections and reports p50/p99 latency and requests/s. Modes: exact
(the scoring of `lgmrec recommend`), faiss IVF-Flat and HNSW (`lgmrec_dist.ann`, search setting chosen
for recall@20 >= 0.95 on held-out users, the recall reported on the other half).

foldin / warmstart: a synthetic catalogue with planted structure (1,500 users, 1,000 items, 15,000
interactions); an "old" log holds 89.4% of the users and items (their interactions: about 80% of the
log), the "new" log all of them (+25% interactions), id maps shuffled differently. foldin: test
Recall@20 of the new run's users folded in from their training history against their trained
embeddings, and the users the old run never saw folded into the old run's model. warmstart: from
scratch on the new log (early stopping) against `--init-from` the old run, with the optimiser reset
(what `lgmrec train` does) and with the old run's Adam state carried (rows mapped by raw id): epochs
and training seconds until test Recall@20 reaches 98% of the from-scratch best.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM, USERS, HISTORY, CENTRES = 64, 10_000, 20, 1024


# ---------------------------------------------------------------------------------------------- latency
def synthetic_tables(num_items: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CENTRES, DIM)).astype(np.float32)
    items = centres[rng.integers(0, CENTRES, num_items)] + 0.7 * rng.standard_normal((num_items, DIM)).astype(np.float32)
    users = centres[rng.integers(0, CENTRES, USERS)] + 0.7 * rng.standard_normal((USERS, DIM)).astype(np.float32)
    hist = rng.integers(0, num_items, (USERS, HISTORY))
    return users, items, hist


def child_serve(num_items: int, mode: str, port: int) -> None:
    """Serve synthetic tables until killed; print one JSON line when ready."""
    import torch

    from lgmrec_dist import ann
    from lgmrec_dist.api import create_app
    from lgmrec_dist.evaluation import _csr_from_pairs
    from lgmrec_dist.recommender import Recommender
    from lgmrec_dist.serve import set_request_threads, start_background
    users, items, hist = synthetic_tables(num_items)
    t0 = time.perf_counter()
    mode, _, threads = mode.partition("-")      # e.g. ivf-1: IVF-Flat, 1 thread per request
    index = None
    if mode != "exact":
        index = ann.build(items, list(range(num_items)), "faiss" if mode == "ivf" else "hnsw", users[:2000])
    set_request_threads(int(threads or 0))
    build_s = time.perf_counter() - t0
    csr = _csr_from_pairs(USERS, num_items, np.repeat(np.arange(USERS), HISTORY), hist.ravel())
    rec = Recommender(torch.from_numpy(users), torch.from_numpy(items), csr, list(range(USERS)),
                      list(range(num_items)), ann=index)
    server, port = start_background(create_app(rec), port=port)
    print(json.dumps({"ready": port, "build_s": build_s, "ann": index.info if index else None}), flush=True)
    while True:
        time.sleep(3600)


def load(port: int, clients: int, requests: int, seed: int = 0) -> dict:
    """Latency percentiles (ms) and throughput of ``requests`` GETs from ``clients`` threads."""
    lat, lock = [], threading.Lock()
    per = max(1, requests // clients)

    def worker(w):
        rng = np.random.default_rng(seed + w)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        for _ in range(per):
            t = time.perf_counter()
            conn.request("GET", f"/recommend?user={int(rng.integers(USERS))}&k=20")
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, body[:200]
            mine.append(time.perf_counter() - t)
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.array(lat) * 1e3
    return {"clients": clients, "requests": len(lat), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "req_per_s": len(lat) / wall}


def part_latency(args) -> list[dict]:
    rows = []
    for n in args.items:
        for mode in args.modes:
            proc = subprocess.Popen([sys.executable, __file__, "--child-serve", str(n), mode], stdout=subprocess.PIPE,
                                    text=True, cwd=ROOT)
            try:
                ready = json.loads(proc.stdout.readline())
                load(ready["ready"], 4, 40)            # warm-up
                info = ready["ann"] or {}
                for clients in (1, 8, 32):
                    r = {"items": n, "mode": mode, "build_s": round(ready["build_s"], 1),
                         "search": info.get("search"), "recall@20": info.get("recall@20"),
                         **load(ready["ready"], clients, max(args.requests, 8 * clients))}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
            finally:
                proc.kill()
                proc.wait()
    return rows


# ------------------------------------------------------------------------------------ foldin, warmstart
def logs(root: Path, seed: int = 7):
    from data_prep.synthetic import generate_synthetic, write_subset
    users, items = 1500, 1000
    data = generate_synthetic(users, items, 15_000, {"image": 64, "text": 32}, seed=seed, num_clusters=100)
    keep = np.sqrt(0.8)   # users and items kept: ~80% of the interactions
    old, new = root / "old", root / "new"
    if not (old / "manifest.json").exists():
        write_subset(old, data, np.arange(int(users * keep)), np.arange(int(items * keep)), order_seed=1)
        write_subset(new, data, np.arange(users), np.arange(items), order_seed=2)
    return old, new


def config(**over):
    from lgmrec_dist.config import load_config
    return load_config(ROOT / "configs" / "demo.yaml", {"embedding_size": 32, "epochs": 60, "stopping_step": 5,
                                                       "num_threads": 2, **over})


def trained(data: Path, out: Path, init_from=None, **over) -> tuple[dict, float]:
    from lgmrec_dist.train import train
    if (out / "metrics.json").exists():
        return json.loads((out / "metrics.json").read_text()), json.loads((out / "wall.json").read_text())["wall_s"]
    t0 = time.perf_counter()
    metrics = train(data, config(**over), out, init_from=init_from)
    wall = time.perf_counter() - t0
    (out / "wall.json").write_text(json.dumps({"wall_s": wall}))
    return metrics, wall


def part_foldin(args) -> dict:
    import torch

    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import PreparedDataset
    from lgmrec_dist.recommender import Recommender
    from lgmrec_dist.train import make_evaluators
    _, new = logs(args.work)
    trained(new, args.work / "scratch")
    rec = Recommender.from_run(args.work / "scratch")
    indptr, indices = rec.train_csr
    hist = [indices[indptr[u]:indptr[u + 1]] for u in range(len(rec.user_raw))]
    _, test_eval = make_evaluators(PreparedDataset.load(new), load_config(args.work / "scratch" / "config.yaml"))
    out = {"trained": test_eval.evaluate_metrics(rec.user_emb, rec.item_emb)["recall@20"]}
    t0 = time.perf_counter()
    folded = rec.fold.user_embeddings(hist)
    out["fold_in_seconds_per_user"] = (time.perf_counter() - t0) / len(hist)
    out["folded"] = test_eval.evaluate_metrics(folded, rec.item_emb)["recall@20"]
    zero = rec.fold.user_embeddings(hist, ego=torch.zeros_like(rec.user_emb))
    out["folded_zero_ego"] = test_eval.evaluate_metrics(zero, rec.item_emb)["recall@20"]
    out["new_users"] = fold_in_new_users(args, rec, test_eval, new)
    print(json.dumps({"test_recall@20": out}), flush=True)
    return out


def fold_in_new_users(args, scratch, test_eval, new: Path) -> dict:
    """The users of the new log that the old run never saw, folded into the old run's model from their
    new-log training items (those the old run knows), against the from-scratch run's trained embeddings
    of the same users. Test items the old run does not know are dropped for the folded users (it cannot
    rank them)."""
    from lgmrec_dist.dataset import TEST, TRAIN, PreparedDataset
    from lgmrec_dist.evaluation import Evaluator, finalize
    from lgmrec_dist.recommender import Recommender
    trained(logs(args.work)[0], args.work / "old_run")
    old = Recommender.from_run(args.work / "old_run")
    ds = PreparedDataset.load(new)
    users = np.array([u for u, r in enumerate(scratch.user_raw) if str(r) not in old.user_index])
    to_old = np.array([old.item_index.get(str(r), -1) for r in scratch.item_raw])
    parts = {}
    for label in (TRAIN, TEST):
        u, i = ds.pairs(label)
        keep = np.isin(u, users) & (to_old[i] >= 0)
        parts[label] = (np.searchsorted(users, u[keep]), to_old[i[keep]])
    with_test = np.unique(parts[TEST][0])
    hist = [parts[TRAIN][1][parts[TRAIN][0] == b] for b in range(len(users))]
    folded = old.fold.user_embeddings(hist)
    ev = Evaluator(len(users), old.num_items, *parts[TRAIN], *parts[TEST], ks=(20,))
    trained_new = finalize(*test_eval.evaluate(scratch.user_emb, scratch.item_emb, user_subset=users))
    return {"users": int(len(users)), "users_with_known_test_items": int(len(with_test)),
            "folded_into_old_run": ev.evaluate_metrics(folded, old.item_emb)["recall@20"],
            "trained_from_scratch": trained_new["recall@20"]}


_SHIPPED_WARM_START = []   # warmstart.warm_start while carry_adam stands in for it


def carry_adam(engine, ds, run_dir) -> dict:
    """The warm start plus the old run's last Adam state, rows mapped by raw id (measured, not shipped)."""
    import pyarrow.parquet as pq
    import torch

    from lgmrec_dist.checkpoint import read_meta, read_sharded
    from lgmrec_dist.dataset import ITEM_MAP, USER_MAP
    from lgmrec_dist.warmstart import _parameters, carried_rows, old_dataset_path
    counts = _SHIPPED_WARM_START[0](engine, ds, run_dir)
    latest = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / "meta.json").is_file())[-1]
    state = read_sharded(latest, 0)["engine"]
    old_path = old_dataset_path(Path(run_dir), read_meta(Path(run_dir) / "best"))
    maps = {k: carried_rows(pq.read_table(old_path / m)["raw_id"].to_pylist(), pq.read_table(ds.path / m)["raw_id"].to_pylist())
            for k, m in (("user", USER_MAP), ("item", ITEM_MAP))}
    params = _parameters(engine)
    for name, old in zip(state["model"].keys(), [state["optimizer"]["state"][i] for i in sorted(state["optimizer"]["state"])]):
        p = params[name]
        new = {"step": old["step"].clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            if name in ("user_embedding", "item_embedding"):
                new_rows, old_rows = maps[name.split("_")[0]]
                t = torch.zeros_like(p)
                t[torch.from_numpy(new_rows)] = old[key][torch.from_numpy(old_rows)]
                new[key] = t
            else:
                new[key] = old[key].clone()
        engine.optimizer.state[p] = new
    return {**counts, "optimizer": f"carried from {latest.name}"}


def reach(run: Path, target: float) -> tuple[int | None, float]:
    """(epochs, training seconds) until the recorded test recall@20 reaches ``target``."""
    seconds = 0.0
    for line in (run / "epochs.jsonl").read_text().splitlines():
        rec = json.loads(line)
        seconds += rec["seconds"]
        if rec.get("test") and rec["test"]["recall@20"] >= target:
            return rec["epoch"] + 1, seconds
    return None, seconds


def part_warmstart(args) -> dict:
    import lgmrec_dist.warmstart as ws
    from lgmrec_dist.dataset import PreparedDataset
    old, new = logs(args.work)
    growth = PreparedDataset.load(new).manifest["num_interactions"] / PreparedDataset.load(old).manifest["num_interactions"]
    scratch, scratch_wall = trained(new, args.work / "scratch")
    best = scratch["test"]["recall@20"]
    target = 0.98 * best
    rows = {"growth": growth, "scratch": {"best_recall@20": best, "best_epoch": scratch["best_epoch"],
                                          "epochs_run": scratch["epochs_run"], "wall_s": scratch_wall,
                                          "to_98%": reach(args.work / "scratch", target)}}
    _, old_wall = trained(old, args.work / "old_run")
    rows["old_run_wall_s"] = old_wall
    warm_epochs = max(3, scratch["best_epoch"] // 5 + 2)
    for label, hook in (("warm_reset", None), ("warm_carry", carry_adam)):
        real = ws.warm_start
        _SHIPPED_WARM_START[:] = [real]
        if hook is not None:
            ws.warm_start = hook
        try:
            m, wall = trained(new, args.work / label, init_from=args.work / "old_run", epochs=warm_epochs)
        finally:
            ws.warm_start = real
        rows[label] = {"best_recall@20": m["test"]["recall@20"], "epochs_run": m["epochs_run"], "wall_s": wall,
                       "to_98%": reach(args.work / label, target)}
    print(json.dumps(rows), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["latency", "foldin", "warmstart"], default="latency")
    p.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--modes", nargs="+", default=["exact", "ivf", "hnsw"],
                   help="exact, ivf, hnsw; MODE-T = T threads per request (serve --threads T)")
    p.add_argument("--work", type=Path, default=Path("/tmp/lgmrec-bench-serve"))
    p.add_argument("--child-serve", nargs=2, metavar=("ITEMS", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_serve:
        child_serve(int(args.child_serve[0]), args.child_serve[1], 0)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load before: {os.getloadavg()}", flush=True)
    {"latency": part_latency, "foldin": part_foldin, "warmstart": part_warmstart}[args.part](args)
    print(f"load after: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
