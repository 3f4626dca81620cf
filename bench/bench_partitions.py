"""Benchmark: peak resident memory per rank of training on a partitioned dataset, P = 1, 2, 4.

    flock /tmp/bench.lock .venv/bin/python bench/bench_partitions.py                # 1.6M interactions, P = 1, 2, 4
    flock /tmp/bench.lock .venv/bin/python bench/bench_partitions.py --interactions 1e7 --partitions 1   # 10M
    .venv/bin/python bench/bench_partitions.py --plan --partitions 8 32 --valid-users 100000   # Amazon 2023
    .venv/bin/python bench/bench_partitions.py --interactions 1e7 --set mode=sampled --set shard_tables=true

The exact mode by default; ``--set mode=sampled --set shard_tables=true`` measures the sampled mode
(``configs/baby.yaml`` with its sampled-mode defaults; ``user_feature_table: true``, which a partitioned
sampled launch needs, is the default), whose records are kept apart (``rows_<size>_sampled.jsonl``) and
whose table lists the sampled engine's held tables (``SampledStep.memory_bytes``) instead of the
exact-mode formula.

The catalogue has MMRec-Baby's user / item / interaction ratios (``bench_train.BABY``) scaled to
``--interactions``, image 512-d and text 384-d features, and is written as a raw Parquet catalogue
(``data_prep.synth_parquet``) once. It is then prepared once per P with ``lgmrec prep`` (``data_prep.prep``,
a Ray job): P = 1 the whole layout, P > 1 with ``--partitions P`` and random partitioning. For each P the
training runs as it would (docs/distributed.md, "Training on partitions"): P = 1 one process with the whole
dataset (``LocalEngine``), P > 1 ``torchrun`` with P ranks, each of which reads only its ``part-k/``. Every
process runs what ``train.train`` runs before and in its loop, but not the loop itself (its final test
ranking of every user costs many minutes at 10M): ``train.load_dataset``, ``engines.build_engine``,
``train.triple_sampler``, ``train.make_evaluators`` (validation on a keyed sample of ``valid_users``),
``--steps`` training steps of the epoch's global batches (``batches.EpochBatches``), then
``engine.embeddings()`` and one validation ranking. ``OMP_NUM_THREADS=1`` and one torch thread per process.

Per process: VmHWM (peak resident set, /proc/self/status) after the imports, after the dataset is opened,
after the engine is built, after start-up (sampler and evaluators built too), after the steps and at the
end, and VmRSS after start-up and at the end; the state terms of docs/distributed.md ("Memory per rank");
the per-node and per-pair arrays a rank holds besides them; times and bytes sent per step. The table gives,
per P, the largest rank's peak, what the memory formula (``rank_bytes``, the one of docs/distributed.md)
predicts for it, and the goal 1.2 × (P = 1 peak) / P + 0.6 GB. Each P's records are kept in
``OUT/rows_<size>.jsonl`` and reused by later invocations (``--rerun`` measures again), so P values can be
measured one at a time. ``--plan`` prints the formula for Amazon Reviews 2023 instead. Memory figures do
not depend on the machine's load; the times do (a shared 2-core machine: read them as rough). At 10M
interactions P = 1 peaks at 14 GB, and P = 2 / 4 need ~18 / ~24 GB for all ranks together (the formula).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import BABY  # noqa: E402

MODALITIES = {"image": 512, "text": 384}
GB = 1e9


def vm_status(key: str) -> int:
    """A /proc/self/status figure (VmHWM, VmRSS) in bytes."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def shape(interactions: float) -> dict:
    n = int(interactions)
    return {k: int(round(v * n / BABY["num_interactions"])) for k, v in BABY.items()}


def tag(interactions: float) -> str:
    return f"{interactions / 1e6:g}m"


def raw_catalogue(interactions: float, out_root: Path) -> Path:
    """The raw Parquet catalogue, generated once (in this process: run it as a child of its own)."""
    from data_prep.synth_parquet import make_parquet_synthetic
    path = out_root / f"raw_{tag(interactions)}"
    if not (path / "synth.json").exists():
        s = shape(interactions)
        make_parquet_synthetic(path, s["num_users"], s["num_items"], s["num_interactions"], MODALITIES, seed=10,
                               overwrite=True)
    return path


def prepared(interactions: float, parts: int, out_root: Path) -> Path:
    """``lgmrec prep`` of the raw catalogue for ``parts`` partitions (random); cached by prep's fingerprint."""
    from data_prep.prep import prep
    raw = raw_catalogue(interactions, out_root)
    out = out_root / f"prepared_{tag(interactions)}_p{parts}"
    prep(raw / "interactions", {m: raw / "features" / f"{m}.parquet" for m in MODALITIES}, out,
         partitions=parts, partition_method="random", progress=False)
    return out


def _nbytes(*arrays) -> int:
    return int(sum(a.nbytes if hasattr(a, "nbytes") else a.numel() * a.element_size() for a in arrays))


RUNTIME = 0.27e9   # Python, torch, DGL, pyarrow and the process group, measured: VmHWM after the imports


def halo_bound(num_nodes: int, pairs: int, parts: int) -> float:
    """Halo nodes of one rank under random partitioning, at most: a node not owned is in the halo when one
    of its deg neighbours is, probability 1 - (1 - 1/P)^deg <= 1 - (1 - 1/P)^mean deg (Jensen)."""
    if parts == 1:
        return 0.0
    return (num_nodes - num_nodes / parts) * (1 - (1 - 1 / parts) ** (2 * pairs / num_nodes))


def rank_bytes(U: float, I: float, E: float, H: float, S: int, P: int, halo: float, d: int = 64, A: int = 4,
               L: int = 2, M: int = 2, y_bytes: int = 4, eval_users: int = 2000, eval_batch: int = 4096,
               item_tile: int = 8192) -> dict:
    """The memory of one rank, term by term (docs/distributed.md, "Memory per rank"): |U|, |I|, E training
    pairs, H held-out pairs, S = Σ d_m, P ranks, ``halo`` nodes; E*, Adam and X_m in float32, Y_m in
    ``y_bytes``. P = 1 is the one-process engine (whole graph, no book, no halo)."""
    from lgmrec_dist.distributed.partitioned import COUNT_BLOCK
    from lgmrec_dist.evaluation import TILE_FLOATS
    from lgmrec_dist.distributed.sharded import SHARDED_CHUNK_BYTES
    from lgmrec_dist.model.features import column_chunk
    N = U + I
    n, Er, Hr = N / P, E / P, H / P               # owned nodes; pairs and held-out pairs of owned users
    nsrc = n + halo                               # rows of [owned ; halo]
    if P == 1:
        graph = 12 * 2 * E + 16 * E + 16 * E + 16 * N   # Ĝ (2E); R with P, Rᵀ with Pᵀ sharing their indices
    else:
        # Ĝ, Ĝᵀ blocks (2E/P nonzeros, 12 B each); R with P (their values; the columns are Ĝ's) and Rᵀ with Pᵀ
        # (a column and two values), sharing row pointers
        graph = 12 * 2 * 2 * E / P + 8 * Er + 16 * Er + 16 * (n + nsrc)
    incident = E * (2 / P - 1 / P ** 2)           # training edges with an owned end (part-k/train_edges)
    t = {"embeddings+adam": 12 * n * d, "features": 4 * I / P * S, "mge_inputs": y_bytes * n * S, "graph": graph,
         "replicated": 12 * S * (d + A),
         "book+ownership": 0 if P == 1 else 4 * N + 8 * n,                # the int32 book; the owned ids
         # validation (a sample of eval_users) and test (every user): a row pointer and an id per evaluated
         # owned user in each of the training and held-out CSRs, a column per pair of theirs (half of H each)
         "evaluator_csrs": (24 * U / P + 8 * (Er + Hr / 2)) * (1 + min(1.0, eval_users / U)),
         "sampler+epoch": 32 * Er + 32 * Er,                               # keys, users, items, index; 4 epoch arrays
         # part-k: train edges with an owned end, held-out pairs, owned and halo ids
         "dataset_rows": 0 if P == 1 else 16 * incident + 17 * Hr + 8 * nsrc}
    transient = {
        # Y_m precomputed in column chunks. One process: c = column_chunk(N) (256 MiB), modelled as 3.5 chunks;
        # P ranks: c sized by the widest rank's rows to a 32 MiB budget, and every chunk goes through buffers
        # made once (LocalGraph._column_chunks): [owned ; halo] rows, the owned rows' product, the rows sent
        # (about as many as the halo) and received
        "start-up (MGE column chunks)": (3.5 * 4 * N * column_chunk(int(N)) if P == 1 else
                                         4 * (nsrc + n + 2 * halo)
                                         * column_chunk(int(nsrc), SHARDED_CHUNK_BYTES, least=1)),
        # the build in blocks of edges (LocalGraph, BUILD_BLOCK): the sorted keys of the incident edges and
        # one block's temporaries (with the allocator's slack) over the finished arrays; measured at 10M,
        # P = 2: 0.31 GB over them (blocks of 2^20 and 2^18 keys alike), modelled as 8 B a key + 0.25 GB.
        # The whole-array build it replaced: 81 B an entry of Ĝ's rows (75 in an earlier RSS measure)
        "start-up (graph blocks built)": 8 * incident + 0.25e9,
        # all-reduced in blocks of COUNT_BLOCK nodes: ~6 int64 arrays of a block
        "start-up (per-node counts of the triples)": 6 * 8 * min(N, COUNT_BLOCK),
        # what a step keeps for its backward pass and the halo rows of its layers (sent, [owned ; halo], their
        # gradients): 11 rows of d floats per owned node, fitted to the measured step peaks (P = 1 at 1.6M and
        # 3.2M: 12.2 and 10.3 per node), and 5 per halo node: 7 fitted at P = 4, 3.2M, less the received copy
        # and the reordered copy that the rows no longer make (RowExchange.extend; 1.6M, P = 8: 2.2 rows)
        "step (activations, halo rows)": 11 * 4 * d * n + 5 * 4 * d * halo,
        # E* of the owned rows; the one reused score tile (on the CPU at most TILE_FLOATS floats: users go
        # through in chunks of rows) and the batch's running top-K; the ring's two item blocks
        "evaluation (E*, score tile, ring)": 4 * n * d
        + 4 * min(eval_batch, eval_users / P, TILE_FLOATS // item_tile) * min(item_tile, I / P)
        + 12 * 50 * min(eval_batch, eval_users / P) + (2 * 4 * d * I / P if P > 1 else 0)}
    held = sum(t.values())
    peak = RUNTIME + held + max(transient.values())
    sent = {"halo rows per CGE layer": 4 * d * halo, "step (forward + backward)": halo * (8 * L * d + 8 * A * M),
            "ring evaluation": (P - 1) / P * I * (4 * d + 8)}
    return {"terms": t, "held": held, "transient": transient, "peak": peak, "sent": sent}


# Amazon Reviews 2023, all categories: 571M interactions, 54.5M users, 48.2M items; 8:1:1 per user gives the
# training / held-out pairs (an upper bound: no k-core filtering assumed); text 384-d (MiniLM) + image 512-d
AMAZON_2023 = dict(U=54.5e6, I=48.2e6, E=0.8 * 571e6, H=0.2 * 571e6, S=384 + 512)


def plan(parts: list[int], eval_users: int) -> str:
    """``rank_bytes`` for Amazon Reviews 2023 on P machines (one rank each), halo at its random-partition bound."""
    a = AMAZON_2023
    lines = [f"Amazon Reviews 2023: |U| = {a['U']:.3g}, |I| = {a['I']:.3g}, E = {a['E']:.3g} training pairs, "
             f"H = {a['H']:.3g} held-out, Σd_m = {a['S']}, d = 64, A = 4, L = 2, valid_users = {eval_users}", ""]
    for P in parts:
        h = halo_bound(a["U"] + a["I"], a["E"], P)
        for yb in (4, 2):
            r = rank_bytes(a["U"], a["I"], a["E"], a["H"], a["S"], P, h, y_bytes=yb, eval_users=eval_users)
            lines.append(f"P = {P}, Y_m in {'float32' if yb == 4 else 'bfloat16'}: halo ≤ {h / 1e6:.1f}M nodes; held "
                         f"{r['held'] / GB:.1f} GB, peak ≈ {r['peak'] / GB:.1f} GB")
            lines.append("  terms GB: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r["terms"].items()))
            lines.append("  transients GB: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r["transient"].items()))
            lines.append("  sent per rank GB: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in r["sent"].items()))
    return "\n".join(lines)


def per_node_bytes(ds, eng, sampler, batches, evaluators) -> dict:
    """What a rank holds besides the state terms: the per-node arrays (partition book, ownership) and
    the per-pair ones (its dataset rows, the sampler and its epoch arrays, the evaluators' CSRs)."""
    out = {}
    if hasattr(ds, "node_part"):
        out["book"] = _nbytes(ds.node_part)
        out["dataset_rows"] = _nbytes(ds.train_users, ds.train_items, ds.eval_users, ds.eval_items, ds.eval_split,
                                      ds.owned_users, ds.owned_items, ds.halo_users, ds.halo_items)
    own = getattr(eng, "own", None)
    if own is not None:
        out["ownership"] = _nbytes(own.owned)  # its part is the book (above)
    out["sampler"] = _nbytes(sampler.keys, sampler.users, sampler.items, sampler.pair_index, sampler.item_pool.excluded)
    out["epoch_arrays"] = _nbytes(batches.positions, *batches.triples)
    out["evaluator_csrs"] = sum(_nbytes(*e.train_csr, *e.heldout_csr, e.users) for e in evaluators)
    return out


def sampled_state(sm) -> dict:
    """The held tables of a :class:`~lgmrec_dist.sampled.step.SampledStep` (bytes), its halo and owned
    nodes (all nodes in one process)."""
    m = sm.model
    return {**sm.memory_bytes(), "halo_rows": getattr(m.graph, "num_halo", 0),
            "owned_nodes": len(m.user_ids) + len(m.item_ids), "owned_users": len(m.user_ids)}


def worker(args) -> None:
    import torch

    mem = {"imports": vm_status("VmHWM")}
    from lgmrec_dist import train as T
    from lgmrec_dist.batches import EpochBatches
    from lgmrec_dist.config import load_config
    from lgmrec_dist.distributed.exchange import CommStats
    from lgmrec_dist.engines import build_engine
    from bench.bench_dist import state_bytes

    torch.set_num_threads(1)
    ctx = None
    if "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from lgmrec_dist.distributed.group import close_process_group, init_process_group
        ctx = init_process_group("cpu")
    mem["imports"] = vm_status("VmHWM")
    cfg = load_config(ROOT / "configs" / "baby.yaml", ["device=cpu", f"valid_users={args.valid_users}", *args.set])
    T.set_determinism(cfg.deterministic)
    T.seed_everything(cfg.seed)
    t0 = time.perf_counter()
    ds = T.load_dataset(args.data, cfg, ctx)
    mem["dataset"] = vm_status("VmHWM")
    eng = build_engine(cfg, ds, ctx)
    mem["engine"] = vm_status("VmHWM")
    sampler, gather = T.triple_sampler(ds, cfg)
    valid_eval, test_eval = T.make_evaluators(ds, cfg)
    setup = time.perf_counter() - t0
    mem["start-up"], rss_startup = vm_status("VmHWM"), vm_status("VmRSS")

    eng.train()
    batches = EpochBatches(sampler, 0, torch.device("cpu"), gather)
    bs, times, losses = cfg.train_batch_size, [], []
    CommStats.take()
    for b in range(args.steps):
        t0 = time.perf_counter()
        users, pos, neg = batches(b, bs)
        losses.append(eng.step(users, pos, neg, b)["loss"])
        times.append(time.perf_counter() - t0)
    sent = CommStats.take() / args.steps
    mem["steps"] = vm_status("VmHWM")
    t0 = time.perf_counter()
    emb = eng.embeddings()
    valid = eng.evaluate(valid_eval, emb)
    eval_s = time.perf_counter() - t0
    mem["end"] = vm_status("VmHWM")
    model = eng.model
    if cfg.mode == "sampled":
        state = sampled_state(eng.sampled)
    else:
        state = state_bytes(model)
        state["owned_users"] = len(model.user_ids)
    row = {"P": ctx.world_size if ctx else 1, "rank": ctx.rank if ctx else 0, "mode": cfg.mode,
           "users": ds.num_users, "items": ds.num_items, "train_pairs": int(ds.manifest["num_train"]),
           "heldout_pairs": int(ds.manifest["num_valid"]) + int(ds.manifest["num_test"]),
           "owned_users": int(state.pop("owned_users")), "owned_nodes": int(state["owned_nodes"]),
           "halo_rows": int(state["halo_rows"]), "valid_users_ranked": int(len(valid_eval.users)),
           "setup_s": round(setup, 1), "step_s": [round(t, 2) for t in times], "eval_s": round(eval_s, 1),
           "loss": [round(x, 6) for x in losses], "recall@20": round(valid.get("recall@20", float("nan")), 5),
           "sent_MB_per_step": round(sent / 1e6, 2) if ctx else 0.0,
           "hwm_GB": {k: round(v / GB, 3) for k, v in mem.items()}, "rss_GB": {"start-up": round(rss_startup / GB, 3), "end": round(vm_status("VmRSS") / GB, 3)},
           "state_MB": {k: round(v / 1e6, 1) for k, v in state.items() if k not in ("halo_rows", "owned_nodes")},
           "arrays_MB": {k: round(v / 1e6, 1) for k, v in
                         per_node_bytes(ds, eng, sampler, batches, (valid_eval, test_eval)).items()}}
    print("BENCH " + json.dumps(row), flush=True)
    eng.close()
    if ctx is not None:
        close_process_group()


def run_p(args, data: Path, parts: int) -> list[dict]:
    """One training launch: P = 1 one process, P > 1 torchrun with P ranks; the ranks' records."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    tail = [__file__, "--worker", "--data", str(data), "--steps", str(args.steps),
            "--valid-users", str(args.valid_users), *sum((["--set", s] for s in args.set), [])]
    cmd = ([sys.executable, *tail] if parts == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={parts}", *tail])
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if res.returncode:
        sys.exit(f"P={parts} failed:\n{res.stderr[-4000:]}")
    decoder = json.JSONDecoder()   # ranks share one stdout: decode each record where it starts
    return [decoder.raw_decode(part)[0] for part in res.stdout.split("BENCH ")[1:]]


def predicted(top: dict) -> float:
    """``rank_bytes``'s peak for a measured rank (its own halo), GB."""
    return rank_bytes(top["users"], top["items"], top["train_pairs"], top["heldout_pairs"], sum(MODALITIES.values()),
                      top["P"], top["halo_rows"], eval_users=top["valid_users_ranked"] * top["P"])["peak"] / GB


def sampled_table(rows: list[dict]) -> str:
    """The sampled mode's rows: the largest rank's peak against the goal, and its held tables (MB)."""
    one = max(r["hwm_GB"]["end"] for r in rows if r["P"] == 1)
    keys = ["embeddings", "features_X", "mge_inputs_Y", "user_feature_sums_RX", "full_graph", "sampler_graph"]
    lines = ["| P | largest rank peak GB | goal 1.2 × P1 / P + 0.6 GB | met | start-up peak GB | " + " | ".join(keys)
             + " | book+ownership | evaluator CSRs | halo rows | s/step | MB sent/step |", "|" + "---|" * (len(keys) + 10)]
    for p in sorted({r["P"] for r in rows}):
        top = max((r for r in rows if r["P"] == p), key=lambda r: r["hwm_GB"]["end"])
        goal, a = 1.2 * one / p + 0.6, top["arrays_MB"]
        lines.append(f"| {p} | {top['hwm_GB']['end']} | {goal:.2f} | "
                     f"{'–' if p == 1 else 'yes' if top['hwm_GB']['end'] <= goal else 'no'} | {top['hwm_GB']['start-up']} | "
                     + " | ".join(str(top["state_MB"].get(k, 0.0)) for k in keys)
                     + f" | {round(a.get('book', 0.0) + a.get('ownership', 0.0), 1)} | {a.get('evaluator_csrs', 0.0)} | "
                     f"{top['halo_rows']:,} | {sorted(top['step_s'])[len(top['step_s']) // 2]} | {top['sent_MB_per_step']} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    if rows and rows[0].get("mode") == "sampled":
        return sampled_table(rows)
    one = max(r["hwm_GB"]["end"] for r in rows if r["P"] == 1)
    lines = ["| P | largest rank peak GB | formula GB | goal 1.2 × P1 / P + 0.6 GB | met | start-up peak GB | graph | emb+Adam | "
             "features | MGE inputs | book+ownership | sampler+epoch | evaluator CSRs | dataset rows | halo rows | "
             "s/step | MB sent/step |",
             "|" + "---|" * 17]
    for p in sorted({r["P"] for r in rows}):
        rs = [r for r in rows if r["P"] == p]
        top = max(rs, key=lambda r: r["hwm_GB"]["end"])
        goal = 1.2 * one / p + 0.6
        s, a = top["state_MB"], top["arrays_MB"]
        mb = lambda *k: round(sum(a.get(x, 0.0) for x in k), 1)  # noqa: E731
        lines.append(f"| {p} | {top['hwm_GB']['end']} | {predicted(top):.2f} | {goal:.2f} | {'–' if p == 1 else 'yes' if top['hwm_GB']['end'] <= goal else 'no'} | "
                     f"{top['hwm_GB']['start-up']} | {s['graph']} | {s['embeddings+adam']} | {s['features']} | "
                     f"{s['mge_inputs']} | {mb('book', 'ownership')} | {mb('sampler', 'epoch_arrays')} | "
                     f"{mb('evaluator_csrs')} | {mb('dataset_rows')} | {top['halo_rows']:,} | "
                     f"{sorted(top['step_s'])[len(top['step_s']) // 2]} | {top['sent_MB_per_step']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interactions", type=float, default=1.6e6, help="catalogue size (Baby's ratios; default 1.6e6)")
    p.add_argument("--partitions", type=int, nargs="+", default=[1, 2, 4], help="P values (1 must be among them)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--valid-users", type=int, default=2000)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for training")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "partitions"))
    p.add_argument("--rerun", action="store_true", help="measure every P again (default: reuse the saved records)")
    p.add_argument("--plan", action="store_true",
                   help="print the formula's bytes per rank for Amazon Reviews 2023 at --partitions (e.g. 8 32); run nothing")
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prep-only", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if args.plan:
        print(plan(args.partitions, args.valid_users))
        return
    out_root = Path(args.out)
    if args.prep_only is not None:
        print("PREPARED " + str(prepared(args.interactions, args.prep_only, out_root)), flush=True)
        return
    if 1 not in args.partitions:
        sys.exit("error: --partitions must include 1 (the goal is relative to the one-process peak)")
    out_root.mkdir(parents=True, exist_ok=True)
    print(f"[bench] {shape(args.interactions)}, load average {os.getloadavg()[0]:.2f}", flush=True)
    from lgmrec_dist.config import load_config
    mode = load_config(ROOT / "configs" / "baby.yaml", args.set).mode
    # each P's records, kept across invocations (one file per catalogue and mode)
    saved = out_root / f"rows_{tag(args.interactions)}{'_sampled' if mode == 'sampled' else ''}.jsonl"
    rows = [json.loads(ln) for ln in saved.read_text().splitlines()] if saved.exists() and not args.rerun else []
    for parts in args.partitions:
        if any(r["P"] == parts for r in rows):
            print(f"[bench] P={parts}: records from {saved} (--rerun to measure again)", flush=True)
            continue
        t0 = time.perf_counter()   # prep in a process of its own: its Ray session and memory end with it
        res = subprocess.run([sys.executable, __file__, "--prep-only", str(parts), "--interactions",
                              str(args.interactions), "--out", str(out_root)], capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("PREPARED ")]
        if res.returncode or not line:
            sys.exit(f"prep P={parts} failed:\n{res.stderr[-4000:]}")
        print(f"[bench] prepared P={parts} in {time.perf_counter() - t0:.0f} s", flush=True)
        for r in run_p(args, Path(line[0].split(" ", 1)[1]), parts):
            rows.append(r)
            print(json.dumps(r), flush=True)
        saved.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"[bench] P={parts} done, load average {os.getloadavg()[0]:.2f}", flush=True)
    print("\n" + table([r for r in rows if r["P"] in args.partitions]))


if __name__ == "__main__":
    main()
