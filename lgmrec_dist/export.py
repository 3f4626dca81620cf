"""Serving outputs of a trained run: embeddings, top-K recommendations, cold-start items.

The model exported is the one at the best-validation epoch (RUNDIR/best/, written by training), so the
exported recommendations are those whose test metrics metrics.json reports.

    lgmrec export --run RUNDIR --out DIR [--top-k 20] [--cold-items FILE]
    torchrun --nproc_per_node P -m lgmrec_dist export --run-dir RUNDIR --out DIR   (users split over ranks)
    lgmrec recommend --run RUNDIR --user RAW_ID [--k 10]
    lgmrec embed-items --run RUNDIR --item-features NAME=PATH [...] --out FILE

Output (Parquet): DIR/users.parquet (raw_id, embedding), DIR/items.parquet (raw_id, embedding, cold),
DIR/recommendations/part-<rank>.parquet (user, rank, item, score) with each user's training items
excluded. Under torchrun the users are split over ranks, one part file each; on P ranks of a dataset
partitioned for P each rank also holds only its partition, and users.parquet and items.parquet are
directories of part files (:func:`export_partitioned`, docs/serving.md "Export on partitions").

Cold-start items (docs/checkpoints.md): an item that was not in training has no ID embedding and no
neighbours in Ĝ, so of E* = E_c + Σ_m rownorm(F^m) + α·rownorm(Σ_m G^m) only what its features decide
remains: F^m from its own features before propagation (x_m·W_m; propagation would need interactions)
and its global embedding G^m = softmax(x_m·V_m / τ)·M^m through the trained hyperedge messages M^m:

    e*_cold = Σ_m rownorm(x_m·W_m) + α·rownorm(Σ_m softmax(x_m·V_m / τ)·M^m)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from lgmrec_dist.checkpoint import CheckpointError, read_best_tables
from lgmrec_dist.config import load_config
from lgmrec_dist.dataset import (ITEM_MAP, TRAIN, USER_MAP, DatasetError, IdMapRows, PreparedDataset,
                                 atomic_directory, features_tensor, parse_named_paths)
from lgmrec_dist.evaluation import ITEM_TILE, MASK_SCORE, _csr_from_pairs, _csr_over, _csr_rows, streaming_topk, topk_over_blocks
from lgmrec_dist.graph import build_graph
from lgmrec_dist.model import TAU, LGMRec, model_params


def trained_dataset(run_dir: Path, data=None):
    """The dataset a run trained on: ``data`` when given, else the path its best model records."""
    from lgmrec_dist.checkpoint import read_meta
    if data is not None:
        return data
    meta = read_meta(Path(run_dir) / "best") if (Path(run_dir) / "best" / "meta.json").is_file() else {}
    return meta.get("dataset_path") or json.loads((Path(run_dir) / "metrics.json").read_text())["dataset"]


def load_trained(run_dir: str | Path, data: str | Path | None = None, device="cpu"):
    """Rebuild the best-validation model of a run in one process: (model, dataset)."""
    run_dir = Path(run_dir)
    best = run_dir / "best"
    meta, tables = read_best_tables(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    ds = PreparedDataset.load(trained_dataset(run_dir, data))
    from lgmrec_dist.checkpoint import dataset_digest
    if meta.get("dataset_digest") != dataset_digest(ds.manifest):
        raise CheckpointError(f"{best} was trained on a different dataset than {ds.path}")
    model = LGMRec(model_params(cfg), ds.num_users, ds.num_items, ds.manifest["modalities"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in [*tables.pop("dense").items(), *tables.items()]:
            params[name].copy_(value)
    tu, ti = ds.pairs(TRAIN)
    model.to(device).attach(build_graph(ds.num_users, ds.num_items, tu, ti),
                            {m: features_tensor(x, device=device) for m, x in ds.features.items()})
    model.eval()
    return model, ds


def _embedding_table(raw_ids, emb: torch.Tensor, extra: dict | None = None) -> pa.Table:
    arr = emb.detach().cpu().numpy().astype(np.float32)
    vec = pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    return pa.table({"raw_id": raw_ids, "embedding": vec, **(extra or {})})


def recommend_users(users: np.ndarray, user_emb, item_emb, train_csr, k: int, tile: int = ITEM_TILE):
    """Top-k (scores, items) for the given users with their training items excluded (rows of -1 pad)."""
    rows = torch.from_numpy(users)
    mask = [torch.from_numpy(a) for a in _csr_rows(*train_csr, users)]
    scores, items = streaming_topk(user_emb[rows], item_emb, mask, k, tile)
    return scores, items


def export(run_dir, out, top_k: int = 20, cold_items: str | Path | None = None, data=None, ctx=None,
           overwrite: bool = False, batch_size: int = 4096, ann: str | None = None) -> Path:
    """Write DIR (module docstring); ``ann`` = an index kind of ``lgmrec_dist.ann``: DIR/ann/ as well. On P
    ranks of a dataset partitioned for P, each rank holds only its partition (:func:`export_partitioned`)."""
    _check_k(top_k, "--top-k")
    if Path(out).exists() and not overwrite:
        raise DatasetError(f"{out} already exists (pass --overwrite to replace it)")
    if ctx is not None:
        from lgmrec_dist.distributed.partitioned import uses_partitions
        path = trained_dataset(run_dir, data)
        if uses_partitions(path, load_config(Path(run_dir) / "config.yaml"), ctx.world_size):
            if cold_items is not None or ann is not None:
                raise DatasetError(f"{path} is partitioned: --cold-items and --ann are not available in a "
                                   f"partitioned export yet (run `lgmrec export` in one process for them)")
            return export_partitioned(run_dir, out, top_k, path, ctx, overwrite, batch_size)
    model, ds = load_trained(run_dir, data)
    user_emb, item_emb = model.final_embeddings()
    item_raw = ds.raw_ids("item")
    cold = np.zeros(ds.num_items, dtype=bool)
    if cold_items is not None:
        t = _read_parquet(cold_items, ("raw_id", "embedding"))
        extra = torch.from_numpy(_vectors(t, "embedding", cold_items))
        if extra.shape[1] != item_emb.shape[1]:
            raise DatasetError(f"{cold_items}: column 'embedding' has dimension {extra.shape[1]}, the run's "
                               f"embeddings have {item_emb.shape[1]} (write it with `lgmrec embed-items` of this run)")
        item_emb = torch.cat([item_emb, extra])
        known, new = item_raw.combine_chunks(), t["raw_id"].combine_chunks()
        if known.type != new.type:  # e.g. integer catalogue ids beside string ids of new items
            known, new = known.cast(pa.string()), new.cast(pa.string())
        item_raw = pa.concat_arrays([known, new])
        cold = np.concatenate([cold, np.ones(len(t), dtype=bool)])
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    tu, ti = ds.pairs(TRAIN)
    train_csr = _csr_from_pairs(ds.num_users, ds.num_items, tu, ti)
    user_raw = ds.raw_ids("user")
    out = Path(out)

    def write(tmp: Path) -> None:
        if rank == 0:
            pq.write_table(_embedding_table(user_raw, user_emb), tmp / "users.parquet")
            pq.write_table(_embedding_table(item_raw, item_emb, {"cold": cold}), tmp / "items.parquet")
            if ann is not None:
                _write_ann(tmp / "ann", ann, item_emb, item_raw.to_pylist(), user_emb)
        mine = np.arange(ds.num_users)[rank::world]
        parts = []
        for start in range(0, len(mine), batch_size):
            users = mine[start:start + batch_size]
            scores, items = recommend_users(users, user_emb, item_emb, train_csr, top_k)
            parts.append(_recommendation_table(users, scores, items, user_raw, item_raw))
        (tmp / "recommendations").mkdir(exist_ok=True)
        pq.write_table(pa.concat_tables(parts) if parts else pa.table({}), tmp / "recommendations" / f"part-{rank}.parquet")

    _write_on_ranks(out, overwrite, ctx, write)
    return out


def _write_on_ranks(out: Path, overwrite: bool, ctx, write) -> None:
    """``write(tmp)`` on every rank into one temporary directory that replaces ``out`` when all are done
    (one process: ``atomic_directory``)."""
    if ctx is None:
        with atomic_directory(out, overwrite) as tmp:
            write(tmp)
        return
    import shutil

    import torch.distributed as dist

    from lgmrec_dist.checkpoint import _barrier
    tmp = out.parent / f".{out.name}.tmp-export"
    if ctx.rank == 0:
        if out.exists() and not overwrite:
            raise DatasetError(f"{out} already exists (pass --overwrite to replace it)")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "recommendations").mkdir(parents=True)
    _barrier()
    write(tmp)
    _barrier()
    if ctx.rank == 0:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()


def _recommendation_table(users: np.ndarray, scores: torch.Tensor, items: torch.Tensor, user_raw, item_raw) -> pa.Table:
    """(user, rank, item, score) rows of the users' top lists; masked training items never leave the run."""
    keep = (scores > MASK_SCORE / 2).cpu().numpy()
    items, scores = items.cpu().numpy(), scores.cpu().numpy()
    u = np.repeat(users, items.shape[1]).reshape(items.shape)
    r = np.tile(np.arange(1, items.shape[1] + 1), (len(users), 1))
    return pa.table({"user": user_raw.take(pa.array(u[keep])), "rank": pa.array(r[keep], pa.int32()),
                     "item": item_raw.take(pa.array(items[keep])), "score": pa.array(scores[keep], pa.float32())})


def export_partitioned(run_dir, out, top_k: int, data, ctx, overwrite: bool = False, batch_size: int = 4096) -> Path:
    """The export of a run on a partitioned dataset, rank k of P holding only partition k (docs/serving.md,
    "Export on partitions"): its rows of the best model, E* of its users and items, its users' top-K
    against the item blocks passed round the ring. Writes DIR/users.parquet/part-k.parquet,
    DIR/items.parquet/part-k.parquet (directories of parts: read them as one table) and
    DIR/recommendations/part-k.parquet."""
    from lgmrec_dist.checkpoint import dataset_digest, read_best_rows, read_meta
    from lgmrec_dist.distributed.partitioned import open_rank_partition
    from lgmrec_dist.distributed.engine import ShardedEngine
    from lgmrec_dist.distributed.ring_topk import ring_blocks

    _check_k(top_k, "--top-k")
    run_dir, out = Path(run_dir), Path(out)
    cfg = load_config(run_dir / "config.yaml")
    ds = open_rank_partition(data, ctx)
    if read_meta(run_dir / "best").get("dataset_digest") != dataset_digest(ds.manifest):
        raise CheckpointError(f"{run_dir / 'best'} was trained on a different dataset than {ds.path}")
    # the exact distributed model infers the owned rows of either mode (the sampled mode's inference is it)
    engine = ShardedEngine(cfg, ds, ctx.device, ctx)
    m = engine.model
    best = read_best_rows(run_dir, m.user_ids.cpu().numpy(), m.item_ids.cpu().numpy())
    with torch.no_grad():
        params = dict(m.named_parameters())
        m.user_embedding.copy_(best["user_embedding"])
        m.item_embedding.copy_(best["item_embedding"])
        for name, value in best["dense"].items():
            params[name].copy_(value)
    user_ids, user_emb, item_ids, item_emb = engine.embeddings()
    train_csr = _csr_over(np.asarray(user_ids), ds.num_items, *ds.pairs(TRAIN))   # rows: the owned users
    batches = [user_ids[s:s + batch_size] for s in range(0, len(user_ids), batch_size)]
    rows = [np.arange(s, s + len(b)) for s, b in zip(range(0, len(user_ids), batch_size), batches)]
    tops = topk_over_blocks(user_emb, rows, rows, ring_blocks(item_ids, item_emb), train_csr, top_k,
                            cfg.eval_item_tile)
    # the raw ids of this rank's users and items and of the items it recommends, not the whole maps
    user_raw = IdMapRows(ds.path / USER_MAP, user_ids)
    shown = [i[s > MASK_SCORE / 2].cpu().numpy() for s, i in tops]       # what _recommendation_table writes
    item_raw = IdMapRows(ds.path / ITEM_MAP, np.concatenate([item_ids, *shown]))

    def write(tmp: Path) -> None:
        k = ctx.rank
        for name, raw, ids, emb in (("users", user_raw, user_ids, user_emb), ("items", item_raw, item_ids, item_emb)):
            (tmp / f"{name}.parquet").mkdir(exist_ok=True)
            extra = {"cold": np.zeros(len(ids), bool)} if name == "items" else None
            pq.write_table(_embedding_table(raw.take(pa.array(ids)), emb, extra), tmp / f"{name}.parquet" / f"part-{k}.parquet")
        parts = [_recommendation_table(b, s, i, user_raw, item_raw) for b, (s, i) in zip(batches, tops)]
        pq.write_table(pa.concat_tables(parts) if parts else pa.table({}), tmp / "recommendations" / f"part-{k}.parquet")

    _write_on_ranks(out, overwrite, ctx, write)
    return out


def _check_k(k: int, flag: str) -> None:
    if k < 1:
        raise DatasetError(f"{flag}: must be >= 1, got {k}")


def _read_parquet(path, columns) -> pa.Table:
    """A Parquet table with the given columns, or a DatasetError naming the file."""
    try:
        t = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - missing file, directory, not Parquet: all a bad argument
        raise DatasetError(f"{path}: cannot read Parquet ({exc})") from None
    for col in columns:
        if col not in t.column_names:
            raise DatasetError(f"{path}: missing column {col!r}")
    if t.num_rows == 0:
        raise DatasetError(f"{path}: no rows")
    return t


def _vectors(t: pa.Table, col: str, path) -> np.ndarray:
    """Column ``col`` of ``t`` as a finite float32 matrix: one equal-length numeric vector per row."""
    try:
        x = np.stack(t[col].to_numpy(zero_copy_only=False)).astype(np.float32)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{path}: column {col!r} must hold numeric vectors of one length ({exc})") from None
    if x.ndim != 2:
        raise DatasetError(f"{path}: column {col!r} must hold vectors, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DatasetError(f"{path}: NaN/inf in column {col!r} (first in row {int(np.argwhere(~np.isfinite(x))[0][0])})")
    return x
def _write_ann(path: Path, kind: str, item_emb, item_raw: list, user_emb, queries: int = 2000) -> None:
    """The item index of ``lgmrec_dist.ann``, its recall measured with the run's users as queries."""
    from lgmrec_dist import ann
    pick = np.random.default_rng(0).permutation(len(user_emb))[:queries]
    index = ann.build(item_emb.numpy(), item_raw, kind, user_emb[pick].numpy())
    index.save(path)
    info = index.info
    print(f"ann {kind}: {info['search_param']} {info['search']}, recall@{ann.RECALL_K} {info[f'recall@{ann.RECALL_K}']:.4f} "
          f"against the exact top-{ann.RECALL_K} ({info['num_queries']} held-out user queries)")


def read_item_features(specs: dict[str, str], id_col: str = "item_id", feature_col: str = "embedding"):
    """Parquet files (id column + fixed-size vector column), one per modality, aligned on their ids."""
    ids, feats = None, {}
    for name, path in specs.items():
        t = _read_parquet(path, (id_col, feature_col))
        these = t[id_col].to_pylist()
        if len(set(these)) != len(these):
            raise DatasetError(f"{path}: duplicate ids in column {id_col!r}")
        x = _vectors(t, feature_col, path)
        if ids is None:
            ids, order = these, np.arange(len(these))
        else:
            pos = {v: i for i, v in enumerate(these)}
            if set(pos) != set(ids):
                raise DatasetError(f"{path}: ids differ from those of {next(iter(specs.values()))}")
            order = np.array([pos[v] for v in ids])
        feats[name] = x[order]
    return ids, feats


@torch.no_grad()
def cold_start_embeddings(model: LGMRec, feats: dict[str, np.ndarray]) -> torch.Tensor:
    """e*_cold = Σ_m rownorm(x_m·W_m) + α·rownorm(Σ_m softmax(x_m·V_m/τ)·M^m) (module docstring)."""
    cfg = model.cfg
    missing = [m for m in model.modalities if m not in feats]
    if missing:
        raise DatasetError(f"cold-start items need every modality of the run; missing {missing}")
    unknown = [m for m in feats if m not in model.modalities]
    if unknown:
        raise DatasetError(f"modality {unknown[0]!r} is not one of the run's modalities {list(model.modalities)}")
    x = {m: torch.as_tensor(feats[m], dtype=torch.float32) for m in model.modalities}
    for m in model.modalities:
        if x[m].shape[1] != model.features[m].shape[1]:
            raise DatasetError(f"modality {m!r}: dimension {x[m].shape[1]}, the run used {model.features[m].shape[1]}")
    e = torch.zeros(len(next(iter(x.values()))), cfg.embedding_size)
    if cfg.use_mge:
        for m in model.modalities:
            e = e + F.normalize(x[m] @ model.proj[m], dim=1)
    if cfg.use_ghe:
        hyper = model.ghe(model.cge(), step=-1, train=False)
        g = sum(torch.softmax(x[m] @ model.hyper[m] / TAU, dim=1) @ h.message for m, h in zip(model.modalities, hyper))
        e = e + cfg.alpha * F.normalize(g, dim=1)
    return e


def embed_items(run_dir, specs: dict[str, str], out, id_col="item_id", feature_col="embedding",
                overwrite: bool = False) -> Path:
    out = Path(out)
    if out.is_dir():
        raise DatasetError(f"--out {out} is a directory (embed-items writes one Parquet file)")
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists (pass --overwrite to replace it)")
    model, _ = load_trained(run_dir)
    ids, feats = read_item_features(specs, id_col, feature_col)
    emb = cold_start_embeddings(model, feats)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        pq.write_table(_embedding_table(pa.array(ids), emb), tmp)
    except OSError as exc:  # a full disk: no half-written temporary, and the message names the output
        tmp.unlink(missing_ok=True)
        if not exc.errno:
            raise
        raise OSError(exc.errno, os.strerror(exc.errno), str(out)) from None
    tmp.replace(out)
    return out


def recommend(run_dir, user: str, k: int = 10) -> list[tuple]:
    _check_k(k, "--k")
    model, ds = load_trained(run_dir)
    raw = ds.raw_ids("user").to_pylist()
    matches = [i for i, r in enumerate(raw) if str(r) == str(user)]
    if not matches:
        raise DatasetError(f"user {user!r} is not in the run's dataset")
    user_emb, item_emb = model.final_embeddings()
    tu, ti = ds.pairs(TRAIN)
    scores, items = recommend_users(np.array(matches[:1]), user_emb, item_emb,
                                    _csr_from_pairs(ds.num_users, ds.num_items, tu, ti), k)
    item_raw = ds.raw_ids("item").to_pylist()
    return [(r + 1, item_raw[i], s) for r, (i, s) in enumerate(zip(items[0].tolist(), scores[0].tolist()))
            if s > MASK_SCORE / 2]


def register_cli(sub) -> None:
    e = sub.add_parser("export", help="embeddings and top-K recommendations of a trained run -> Parquet")
    # --run-dir: under torchrun, whose own --run-path makes a script's "--run" an ambiguous option
    e.add_argument("--run", "--run-dir", dest="run", required=True, help="run directory of `lgmrec train`")
    e.add_argument("--out", required=True)
    e.add_argument("--top-k", type=int, default=20)
    e.add_argument("--cold-items", help="Parquet from `lgmrec embed-items` to rank beside the catalogue")
    e.add_argument("--data", help="prepared dataset (default: the one the run trained on)")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--ann", choices=["faiss", "hnsw"],
                   help="also an item index DIR/ann/ (faiss IVF-Flat or HNSW) for `lgmrec serve --ann`")
    e.set_defaults(func=_cmd_export)
    r = sub.add_parser("recommend", help="print the top-K items for one user of a trained run")
    r.add_argument("--run", "--run-dir", dest="run", required=True)
    r.add_argument("--user", required=True, help="raw user id")
    r.add_argument("--k", type=int, default=10)
    r.set_defaults(func=_cmd_recommend)
    c = sub.add_parser("embed-items", help="embed items unseen in training from their modality features")
    c.add_argument("--run", "--run-dir", dest="run", required=True)
    c.add_argument("--item-features", action="append", required=True, metavar="NAME=PATH")
    c.add_argument("--id-col", default="item_id")
    c.add_argument("--feature-col", default="embedding")
    c.add_argument("--out", required=True)
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_embed_items)


def _run(fn) -> int:
    fn()  # its failures are reported by the command line's one error path (entry.guarded)
    return 0


def _cmd_export(args) -> int:
    from lgmrec_dist.distributed.group import close_process_group, init_process_group, launched_by_torchrun
    ctx = init_process_group("cpu") if launched_by_torchrun() else None
    try:
        code = _run(lambda: print(f"wrote {export(args.run, args.out, args.top_k, args.cold_items, args.data, ctx, args.overwrite, ann=args.ann)}"))
        if ctx is not None:
            close_process_group()
        return code
    finally:
        if ctx is not None:      # after an error the other ranks may be gone: no barrier
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()


def _cmd_recommend(args) -> int:
    def show():
        rows = recommend(args.run, args.user, args.k)
        print(f"{'rank':>4}  {'item':<24} {'score':>10}")
        for rank, item, score in rows:
            print(f"{rank:>4}  {str(item):<24} {score:>10.4f}")
    return _run(show)


def _cmd_embed_items(args) -> int:
    def run():
        specs = parse_named_paths(args.item_features, "--item-features")
        print(f"wrote {embed_items(args.run, specs, args.out, args.id_col, args.feature_col, args.overwrite)}")
    return _run(run)
