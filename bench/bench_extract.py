"""Benchmark: `lgmrec extract` text throughput (items/s) with all-MiniLM-L6-v2, on CPU or GPU.

    .venv/bin/python bench/bench_extract.py                      # 10k items, whatever this machine has
    .venv/bin/python bench/bench_extract.py --items 10000 --workers 1 --batch-size 128
    .venv/bin/python bench/bench_extract.py --ray-address auto   # an existing cluster

Synthetic MMRec-like item text (title, brand, 3 categories, a 30-80 word description; the default
join of `lgmrec extract`), written to Parquet, then the real job (`data_prep.extract.run_extract`) on a
private local Ray cluster sized to this machine: CPU actors when there is no GPU, one GPU actor per GPU
otherwise (the same script is the GPU check). Reported: items/s of the Ray job (shards submitted to
last shard written, actor start-up and model loading included: the figure the job prints), items/s in
steady state (first shard written to last shard written), items/s end to end (Ray start and the final
file included), and, side by side in the same run, sentence-transformers'
own `encode` in this one process on the same strings (the no-Ray baseline). One JSON line per run is
appended to bench/out/extract/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("soft cotton durable stainless steel compact travel kitchen outdoor kids gift premium classic wireless "
         "bluetooth organic baby stroller bottle blanket toy puzzle wooden electric guitar strings car engine "
         "filter cookbook recipes italian leather wallet running shoes women men waterproof jacket lamp desk "
         "office chair ergonomic pillow memory foam mattress cover bamboo towel set ceramic mug coffee maker "
         "grinder knife sharpener cutting board glass storage container lid silicone spatula pan pot").split()


def make_items(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    w = np.array(WORDS)

    def words(k):
        return " ".join(w[rng.integers(0, len(w), k)])

    titles = [words(rng.integers(6, 13)).title() for _ in range(n)]
    brands = [None if rng.random() < 0.1 else f"Brand{rng.integers(0, 500)}" for _ in range(n)]
    cats = [["Home & Kitchen", words(1).title(), words(2).title()] for _ in range(n)]
    descs = [None if rng.random() < 0.1 else words(rng.integers(30, 81)) + "." for _ in range(n)]
    return pa.table({"item_id": pa.array([f"B{i:09d}" for i in range(n)]), "title": titles, "brand": brands,
                     "categories": pa.array(cats, pa.list_(pa.string())), "description": descs})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--batch-size", type=int, help="default: the job's (64)")
    ap.add_argument("--shard-size", type=int)
    ap.add_argument("--workers", type=int, help="encoder actors (default: one per CPU, or one per GPU)")
    ap.add_argument("--num-gpus-per-worker", type=float)
    ap.add_argument("--num-cpus", type=int, help="CPUs of the private Ray cluster (default: all)")
    ap.add_argument("--ray-address", help="join this cluster instead of starting a private one")
    ap.add_argument("--baseline-items", type=int, default=2000,
                    help="strings for the in-process sentence-transformers baseline (0: skip)")
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "out" / "extract"))
    args = ap.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from data_prep import encoders
    from data_prep.extract import ExtractConfig, run_extract

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items_path = out_dir / f"items_{args.items}.parquet"
    table = make_items(args.items)
    pq.write_table(table, items_path)
    cols = ["title", "brand", "categories", "description"]
    strings = encoders.join_text_columns([table.column(c) for c in cols])
    model_dir = encoders.resolve_text_model(None)
    st = encoders.load_sentence_transformer(model_dir, "cuda" if torch.cuda.is_available() else "cpu")
    tok = st.tokenizer(strings[:1000], truncation=True, max_length=st.max_seq_length)["input_ids"]
    mean_tokens = float(np.mean([len(t) for t in tok]))

    load = os.getloadavg()
    t0 = time.perf_counter()
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
    ray_start = time.perf_counter() - t0
    resources = ray.cluster_resources()
    out = out_dir / f"text_{args.items}.parquet"
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    try:
        summary = run_extract(ExtractConfig(items=str(items_path), out=str(out), text_cols=cols,
                                            batch_size=args.batch_size, shard_size=args.shard_size,
                                            workers=args.workers, num_gpus_per_worker=args.num_gpus_per_worker,
                                            overwrite=True))
    finally:
        ray.shutdown()
    end_to_end = time.perf_counter() - t0

    baseline = None
    if args.baseline_items:
        sub = strings[:args.baseline_items]
        st.encode(sub[:64], batch_size=args.batch_size or 64)  # warm-up
        t1 = time.perf_counter()
        st.encode(sub, batch_size=args.batch_size or 64, convert_to_numpy=True)
        baseline = len(sub) / (time.perf_counter() - t1)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    result = {
        "items": args.items, "mean_tokens": round(mean_tokens, 1), "batch_size": args.batch_size or 64,
        "workers": summary["workers"],
        "device": gpu or f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "ray_cpus": resources.get("CPU"), "ray_gpus": resources.get("GPU", 0),
        "items_per_s_job": round(summary["items_per_s"], 1),
        "items_per_s_steady": round(summary["steady_items_per_s"], 1) if summary["steady_items_per_s"] else None,
        "items_per_s_end_to_end": round(args.items / end_to_end, 1),
        "job_s": round(summary["job_seconds"], 1), "shards": summary["shards"], "end_to_end_s": round(end_to_end, 1),
        "ray_start_s": round(ray_start, 1),
        "in_process_items_per_s": round(baseline, 1) if baseline else None,
        "loadavg_before": [round(x, 2) for x in load], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__, "command": " ".join([Path(sys.executable).name] + sys.argv),
    }
    print(json.dumps(result))
    with open(out_dir / "results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
