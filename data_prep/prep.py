"""``lgmrec prep``: raw Parquet interaction logs + item feature files -> prepared dataset.

A Ray Data job (docs/prep.md has the full description)::

    prep(interactions, {"text": "feats/text.parquet", "image": "img.npy"}, out, kcore=5, split="mmrec")

Stages
 1. **schema**   every input file's Parquet footer is read on the driver: the id / timestamp / vector
                 columns must exist with a usable type (ids: integers or strings, the same kind in every
                 file; timestamp: integer, timestamp or float; vectors: (fixed-size) list of floats).
 2. **read**     Ray Data reads the interaction files (one task per ~1M rows of row groups) and, in the
                 same tasks, normalises the columns (dictionary-decoded, ids to int64/string, timestamp
                 to int64 or float64) and drops rows with a null user id, item id or timestamp; feature
                 Parquet files are read the same way and checked per row (null / NaN / inf / vector length).
 3. **dedup**    exact duplicate (user, item, timestamp) rows are dropped (the first copy is kept).
 4. **k-core**   rows of users or items with fewer than ``kcore`` rows are removed, repeatedly, until no
                 row is removed (a fixed point; MMRec's 5-core, docs/model.md §3).
 5. **re-index** dense ids 0..U-1 / 0..I-1 in order of first appearance in the filtered rows (MMRec's
                 ``pd.unique``); the raw ids are kept in ``user_map.parquet`` / ``item_map.parquet``.
 6. **split**    ``mmrec``: per user, rows in a seeded random order (a keyed hash of the row's position in
                 the log), n < 10 -> n-2/1/1, else h = ⌊0.2n⌋ held out, h//2 valid, the rest test (§2,
                 :func:`data_prep.steps.keyed_mmrec_split`); ``temporal``: the same counts, the newest rows
                 held out (valid before test; equal timestamps keep input order).
 7. **features** each modality is aligned to the item index (row i = item i); items without a vector get
                 the mean vector of the items that have one (counted in the manifest), or are refused with
                 ``require_features``.
 8. **partition** the training graph is split into ``partitions`` parts (METIS or random,
                 :mod:`data_prep.partition`); ``partitions/node_part.npy`` (the partition book) holds each
                 node's part.
 9. **write**    atomic, sha256 per file in the manifest; ``interactions.parquet`` and, for P > 1, one
                 ``part-k/`` directory per part are written by Ray tasks (:mod:`data_prep.writing`).

Steps 3-6 run as Ray tasks over blocks of the log that stay in the object store
(:mod:`data_prep.blocks`); the driver holds per-node arrays only (counts, first rows, id maps, the
partition book). :func:`data_prep.steps.reference_steps` is the same computation over whole arrays in
one process, which the Ray job is tested against. Feature vectors stay in the object store (or their
.npy file) and Ray tasks write the aligned matrices (:mod:`data_prep.features`).

The stages live in their own modules: input files :mod:`data_prep.files`, the Ray session
:mod:`data_prep.ray_session`, schemas and the Ray read of the log :mod:`data_prep.reading`, the
numpy steps :mod:`data_prep.steps`, the Ray tasks over blocks :mod:`data_prep.blocks`, the writes
:mod:`data_prep.writing`, features :mod:`data_prep.features`; :func:`prep` is
the list of stage calls.

Bad input raises :class:`~lgmrec_dist.dataset.DatasetError` naming the file and column; nothing is
written. ``register_cli`` adds the ``prep`` subcommand to an argparse parser.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from lgmrec_dist.dataset import (INTERACTIONS, MANIFEST, DatasetError, atomic_directory, finish_manifest,
                                 parse_named_paths, verify_files, write_maps_and_features)
from lgmrec_dist.dataset_parts import part_dir
from data_prep import blocks, writing
from data_prep.features import (align, check_feature_schemas, feature_source, finish_parquet_features,
                                load_npy_features, mean_vector, read_parquet_features)
from data_prep.features import write_matrices as features_write
from data_prep.files import file_stamp, resolve_files
from data_prep.mmrec import check_modality_name
from data_prep.partition import METHODS, partition_nodes, write_partitions
from data_prep.ray_session import ray_data_settings, ray_session, task_os_errors
from data_prep.reading import check_interaction_schemas, read_interactions
from data_prep.steps import duplicate_rows, kcore_filter, temporal_split, unify_dictionaries

__all__ = ["prep", "register_cli", "temporal_split", "kcore_filter", "duplicate_rows", "unify_dictionaries",
           "resolve_files", "ray_session", "summary_table", "SPLITS"]

SPLITS = ("mmrec", "temporal")
PREP_VERSION = 2                        # 2: the mmrec split draws a keyed random order per row
FEATURE_VALUES_PER_TASK = 1 << 24        # ~64 MB of float32 per feature-reading task


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = self.last = time.perf_counter()

    def __call__(self, stage: str, message: str) -> None:
        now = time.perf_counter()
        if self.enabled:
            print(f"[prep] {stage:<10} {message}  ({now - self.last:.2f}s)", flush=True)
        self.last = now

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def _fmt(n) -> str:
    return f"{int(n):,}"


# --------------------------------------------------------------------------------------------------
# options, fingerprint, an existing output
# --------------------------------------------------------------------------------------------------

def _check_options(split, time_col, partition_method, kcore, partitions, item_features, user_col, item_col):
    if split not in SPLITS:
        raise DatasetError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "temporal" and not time_col:
        raise DatasetError("the temporal split needs a timestamp column (--time-col)")
    if partition_method not in METHODS:
        raise DatasetError(f"--partition-method must be one of {', '.join(METHODS)}, got {partition_method!r}")
    if int(kcore) != kcore or kcore < 0:
        raise DatasetError(f"--kcore must be a non-negative integer, got {kcore!r}")
    if int(partitions) != partitions or partitions < 1:
        raise DatasetError(f"--partitions must be a positive integer, got {partitions!r}")
    if not item_features:
        raise DatasetError("at least one --item-features NAME=PATH is required")
    if len({user_col, item_col, time_col} - {None}) != (3 if time_col else 2):
        raise DatasetError("--user-col, --item-col and --time-col must name different columns")


def _fingerprint(options: dict, inter_files: list[str], sources: dict) -> str:
    """sha256 of the prep version, the options and every input's (path, size, mtime)."""
    stamps = {"interactions": [file_stamp(f) for f in inter_files],
              "features": {n: [file_stamp(f) for f in s["files"]] for n, s in sources.items()}}
    return hashlib.sha256(json.dumps({"version": PREP_VERSION, "options": options, "inputs": stamps},
                                     sort_keys=True).encode()).hexdigest()


def _existing_dataset(out: Path, fingerprint: str, overwrite: bool):
    """None: write (out missing, empty, or overwrite); a manifest: out already holds this very dataset."""
    if not out.exists() or overwrite:
        return None
    if out.is_dir() and not any(out.iterdir()):
        return None
    mpath = out / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError):
        manifest = None
    if manifest and manifest.get("prep", {}).get("fingerprint") == fingerprint:
        try:
            verify_files(out, manifest)  # "nothing to do" only for an intact copy
        except DatasetError as exc:
            raise DatasetError(f"{exc}; pass --overwrite to prepare it again") from None
        return manifest
    what = "a different dataset" if manifest else "something that is not a prepared dataset"
    raise DatasetError(f"{out}: output directory already exists and holds {what}; pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------
# the stages (module docstring), in order
# --------------------------------------------------------------------------------------------------

def _schema(say, inter_files, sources, o) -> tuple[dict, dict]:
    """1. Parquet footers only (driver): -> interaction schema info, feature metadata per Parquet modality."""
    info = check_interaction_schemas(inter_files, o["user_col"], o["item_col"], o["time_col"])
    item_kind = info["item_kind"]
    feature_metas = {n: (check_feature_schemas(n, s, o["item_col"], o["feature_col"], item_kind)
                         if s["kind"] == "parquet" else None) for n, s in sources.items()}
    say("schema", f"{len(inter_files)} interaction file(s), {_fmt(info['rows'])} rows; ids: user "
                  f"{info['user_kind']}, item {item_kind}; modalities {', '.join(sources)}")
    if info["rows"] == 0:
        raise DatasetError(f"{inter_files[0]}: the interaction files hold no rows")
    return info, feature_metas


def _read(say, ray, inter_files, info, o) -> tuple[list, int]:
    """2. the log through Ray Data: -> refs of normalised blocks without null rows, read tasks."""
    refs, tasks = read_interactions(ray, inter_files, info["metas"], info, o["user_col"], o["item_col"],
                                    o["time_col"], f"{inter_files[0]}: reading interactions")
    return refs, tasks


def _encode(say, ray, refs, inter_files, info, tasks, o) -> tuple[dict, int]:
    """Raw ids -> codes (per-block dictionaries merged on the driver): -> code blocks, rows dropped (null)."""
    enc = blocks.encode(ray, refs)
    n_valid = enc["rows"]
    dropped_null = info["rows"] - n_valid
    say("read", f"{_fmt(n_valid)} rows in {tasks} Ray task(s); {_fmt(dropped_null)} with a null "
                f"user id, item id or timestamp dropped")
    if n_valid == 0:
        raise DatasetError(f"{inter_files[0]}: every row has a null {o['user_col']!r}, {o['item_col']!r} or "
                           f"{o['time_col']!r} value")
    say("encode", f"{_fmt(len(enc['user_dict']))} distinct users, {_fmt(len(enc['item_dict']))} distinct items")
    return enc, dropped_null


def _read_features(say, ray, sources, feature_metas, item_kind, o) -> dict:
    """2. the feature files (Parquet through Ray Data, .npy memory-mapped): -> {name: (ids, vector source)}."""
    item_col, feature_col = o["item_col"], o["feature_col"]
    parquet_sources = {n: s for n, s in sources.items() if s["kind"] == "parquet"}
    parquet_tables = read_parquet_features(ray, parquet_sources, feature_metas, item_col, feature_col, item_kind,
                                           FEATURE_VALUES_PER_TASK) if parquet_sources else {}
    raw_feats = {}
    for name, src in sources.items():
        if src["kind"] == "parquet":
            raw_feats[name] = finish_parquet_features(name, src, parquet_tables.pop(name), item_col, feature_col)
        else:
            raw_feats[name] = load_npy_features(name, src, item_col, item_kind)
        say("read", f"modality {name!r}: {_fmt(len(raw_feats[name][0]))} vectors of dim "
                    f"{raw_feats[name][1]['dim']}")
    return raw_feats


def _dedup(say, ray, enc, o):
    """3. exact duplicate rows dropped (hash shuffle on (user, item)), the first copy kept."""
    blks, n_dup = blocks.dedup(ray, enc.pop("blocks"), len(enc["item_dict"]))  # the encoded blocks are freed
    user_col, item_col, time_col = o["user_col"], o["item_col"], o["time_col"]
    key_cols = f"({user_col}, {item_col}, {time_col})" if time_col else f"({user_col}, {item_col})"
    say("dedup", f"{_fmt(n_dup)} exact duplicate {key_cols} rows dropped; {_fmt(enc['rows'] - n_dup)} left")
    return blks, n_dup


def _kcore(say, ray, interactions, blks, enc, n_before, o):
    """4. the iterative k-core (counts summed on the driver, filters in tasks): -> blocks, rows, rounds."""
    kcore = o["kcore"]
    blks, rounds, n_left = blocks.kcore(ray, blks, kcore, len(enc["user_dict"]), len(enc["item_dict"]), n_before)
    if n_left == 0:
        raise DatasetError(f"{interactions}: all {_fmt(n_before)} interactions were removed by the "
                           f"{kcore}-core filter on columns {o['user_col']!r} and {o['item_col']!r} (no set of "
                           f"users and items has >= {kcore} interactions each); lower --kcore")
    say("k-core", f"{kcore}-core reached after {rounds} filtering round(s): {_fmt(n_before - n_left)} rows "
                  f"dropped; {_fmt(n_left)} left")
    return blks, n_left, rounds


def _reindex_split(say, ray, blks, enc, o) -> dict:
    """5-6. dense ids in order of first appearance, then per-user split labels (user-hash buckets)."""
    res = blocks.reindex_and_split(ray, blks, len(enc["user_dict"]), len(enc["item_dict"]), o["split"], o["seed"])
    res["user_raw"] = enc["user_dict"].take(pa.array(res.pop("user_codes")))
    res["item_raw"] = enc["item_dict"].take(pa.array(res.pop("item_codes")))
    say("re-index", f"{_fmt(len(res['user_raw']))} users, {_fmt(len(res['item_raw']))} items")
    c = res["split_counts"]
    say("split", f"{o['split']}: train {_fmt(c[0])}, valid {_fmt(c[1])}, test {_fmt(c[2])}")
    return res


def _features(say, ray, raw_feats, sources, item_raw, o) -> tuple[dict, dict]:
    """7. each modality aligned to the item index: -> {name: aligned source}, {name: manifest entry}."""
    features, feature_info = {}, {}
    for name in list(raw_feats):
        ids, source = raw_feats.pop(name)
        src = sources[name]
        aligned, n_missing, unused = align(name, src["path"], ids, source, item_raw, o["require_features"],
                                           o["item_col"])
        aligned["mean"] = mean_vector(ray, aligned, len(item_raw) - n_missing) if n_missing else None
        features[name] = aligned
        feature_info[name] = {"source": src["path"], "dim": int(aligned["dim"]), "vectors": len(ids),
                              "missing": n_missing, "unused": int(unused), "fill": "mean" if n_missing else None}
        say("features", f"{name}: {aligned['dim']}-d, {_fmt(n_missing)} items without a vector"
                        f"{' (mean vector)' if n_missing else ''}, {_fmt(unused)} vectors of unknown items "
                        f"ignored")
    return features, feature_info


def _partition(say, ray, blks, num_users, num_items, o):
    """8. the training graph in ``partitions`` parts: -> node parts (the book), their statistics, method."""
    partitions, method = o["partitions"], o["partition_method"]
    if partitions > 1 and method == "metis":      # METIS needs the whole graph in one process
        tu, ti = writing.train_pairs(ray, blks)
    else:                                         # one part, or random: per-node only, no edges needed
        tu = ti = np.zeros(0, dtype=np.int64)
    node_part = partition_nodes(num_users, num_items, tu, ti, partitions, method, o["seed"])
    del tu, ti
    book = ray.put(node_part)
    pstats = writing.stats(ray, blks, book, num_users, partitions)
    method = method if partitions > 1 else "single"
    say("partition", f"{partitions} part(s) ({method}): train edges per part {pstats['train_edges']}, "
                     f"edge cut {100 * pstats['edge_cut_fraction']:.1f}%")
    return node_part, book, pstats, method


def _write(say, ray, out, res, features, node_part, book, pstats, method, manifest_extra, info, o, overwrite):
    """9. the dataset directory, atomically: interactions and ``part-k/`` by Ray tasks, the rest here."""
    num_users, num_items = len(res["user_raw"]), len(res["item_raw"])
    time_dtype = (np.float64 if info["time_kind"] == "float" else np.int64) if o["time_col"] else None
    P = o["partitions"]
    with atomic_directory(out, overwrite) as tmp, task_os_errors():  # a worker's full disk names `out`
        known = {INTERACTIONS: writing.write_interactions(ray, res["blocks"], info["rows"], tmp, time_dtype)}
        write_maps_and_features(tmp, num_users, num_items, res["user_raw"], res["item_raw"], {})
        write_partitions(tmp, node_part, method=method, num_users=num_users, num_items=num_items, stats=pstats)
        if P > 1:
            sums, counts = writing.write_parts(ray, res["blocks"], tmp, book, num_users, P)
            known.update(sums)
            manifest_extra = {**manifest_extra, "partition_dirs": counts}
        # every modality: the whole matrix, and each part's owned rows
        targets = [("features", np.arange(num_items, dtype=np.int64), num_items)]
        for k in range(P if P > 1 else 0):
            owned = node_part[num_users:] == k
            dest = np.full(num_items, -1, dtype=np.int64)
            dest[owned] = np.arange(int(owned.sum()), dtype=np.int64)
            targets.append((f"{part_dir(k)}/features", dest, int(owned.sum())))
        jobs, names = [], []
        for name, source in features.items():
            rels = [f"{d}/{name}.npy" for d, _, _ in targets]
            for d, _, _ in targets:
                (tmp / d).mkdir(parents=True, exist_ok=True)
            src_ref = ray.put({k: v for k, v in source.items() if k != "mean"})
            jobs += features_write(ray, [(str(tmp / r), dest, n) for r, (_, dest, n) in zip(rels, targets)],
                                   src_ref, source["mean"])
            names += rels
        known.update(zip(names, ray.get(jobs)))
        manifest = finish_manifest(tmp, num_users=num_users, num_items=num_items, split_counts=res["split_counts"],
                                   modalities={n: int(s["dim"]) for n, s in features.items()},
                                   manifest_extra=manifest_extra, known=known)
    say("write", f"{out} ({len(manifest['files'])} files)")
    return manifest


def prep(interactions, item_features: dict, out, kcore: int = 5, split: str = "mmrec", seed: int = 999,
         partitions: int = 1, partition_method: str = "metis", user_col: str = "user_id",
         item_col: str = "item_id", time_col: str | None = "timestamp", feature_col: str = "embedding",
         require_features: bool = False, overwrite: bool = False, ray_address: str | None = None,
         progress: bool = True) -> dict:
    """Prepare a dataset from raw Parquet logs and item features (module docstring); return its manifest.

    ``interactions``: a Parquet file, directory or glob (or a list of them). ``item_features``: modality
    name -> Parquet file/directory/glob (``item_col`` + list ``feature_col``) or ``.npy`` matrix with the
    ids in a sibling ``<stem>.ids.parquet`` / ``<stem>.ids.npy``; insertion order = modality order.
    ``time_col=None`` (or "") means the log has no timestamp: duplicates are exact (user, item) rows and
    only the ``mmrec`` split is possible. If ``out`` already holds the dataset these very inputs and
    options produce (same fingerprint), nothing is done and its manifest is returned.
    """
    say = _Progress(progress)
    out = Path(out)
    time_col = time_col or None
    _check_options(split, time_col, partition_method, kcore, partitions, item_features, user_col, item_col)
    inter_files = resolve_files(interactions, "interaction")
    sources = {}
    for name, spec in item_features.items():
        check_modality_name(name, str(spec))
        sources[name] = feature_source(name, spec)
    o = {"kcore": int(kcore), "split": split, "seed": int(seed), "partitions": int(partitions),
         "partition_method": partition_method, "user_col": user_col, "item_col": item_col,
         "time_col": time_col, "feature_col": feature_col, "require_features": bool(require_features)}
    fingerprint = _fingerprint(o, inter_files, sources)
    existing = _existing_dataset(out, fingerprint, overwrite)
    if existing is not None:
        say("done", f"{out} already holds this dataset (same inputs and options); nothing to do")
        return existing
    replace = out.exists()

    info, feature_metas = _schema(say, inter_files, sources, o)
    t_enter = time.perf_counter()
    with ray_session(ray_address, say=say) as ray, \
            ray_data_settings(preserve_order=True, log_level=logging.WARNING):  # blocks in log order
        ray_seconds = time.perf_counter() - t_enter
        refs, tasks = _read(say, ray, inter_files, info, o)
        raw_feats = _read_features(say, ray, sources, feature_metas, info["item_kind"], o)
        enc, dropped_null = _encode(say, ray, refs, inter_files, info, tasks, o)
        del refs
        blks, n_dup = _dedup(say, ray, enc, o)
        blks, n_left, rounds = _kcore(say, ray, interactions, blks, enc, enc["rows"] - n_dup, o)
        res = _reindex_split(say, ray, blks, enc, o)
        del blks
        num_users, num_items = len(res["user_raw"]), len(res["item_raw"])
        features, feature_info = _features(say, ray, raw_feats, sources, res["item_raw"], o)
        node_part, book, pstats, method = _partition(say, ray, res["blocks"], num_users, num_items, o)
        nodes = sorted(enc.pop("nodes") | res.pop("nodes"))
        manifest_extra = {
            "source": "prep",
            "kcore": o["kcore"], "split": split, "seed": o["seed"],
            "partitions": o["partitions"], "partition_method": method,
            "input_rows": int(info["rows"]),
            "dropped": {"null": int(dropped_null), "duplicate": int(n_dup),
                        "kcore": int(enc["rows"] - n_dup - n_left)},
            "kcore_rounds": int(rounds),
            "missing_features": {n: v["missing"] for n, v in feature_info.items()},
            "features": feature_info,
            "id_types": {"user": info["user_kind"], "item": info["item_kind"]},
            "prep": {"version": PREP_VERSION, "fingerprint": fingerprint, "options": o,
                     "interactions": inter_files, "ray_nodes": len(nodes)},
        }
        manifest = _write(say, ray, out, res, features, node_part, book, pstats, method, manifest_extra, info, o,
                          overwrite or replace)
    if progress:
        print(summary_table(manifest, pstats, say.elapsed(), ray_seconds), flush=True)
    return manifest


def summary_table(manifest: dict, pstats: dict | None = None, seconds: float | None = None,
                  ray_seconds: float = 0.0) -> str:
    """The end-of-job table: rows left and dropped after each step, split, features, partitions, time."""
    d = manifest["dropped"]
    n0 = manifest["input_rows"]
    n1 = n0 - d["null"]
    n2 = n1 - d["duplicate"]
    n3 = n2 - d["kcore"]
    rows = [("input rows", n0, ""), ("null ids / timestamps", n1, d["null"]),
            ("exact duplicates", n2, d["duplicate"]),
            (f"{manifest['kcore']}-core ({manifest['kcore_rounds']} rounds)", n3, d["kcore"])]
    lines = ["", f"{'step':<28}{'rows':>14}{'dropped':>12}"]
    lines += [f"{name:<28}{_fmt(n):>14}{(_fmt(x) if x != '' else ''):>12}" for name, n, x in rows]
    lines.append(f"{'users / items':<28}{_fmt(manifest['num_users']) + ' / ' + _fmt(manifest['num_items']):>14}")
    lines.append(f"{'train / valid / test':<28}"
                 f"{' / '.join(_fmt(manifest[k]) for k in ('num_train', 'num_valid', 'num_test')):>14}"
                 f"  ({manifest['split']} split, seed {manifest['seed']})")
    for name, f in manifest.get("features", {}).items():
        lines.append(f"{'features ' + name:<28}{str(f['dim']) + '-d':>14}{_fmt(f['missing']):>12} missing"
                     f"{' -> mean' if f['missing'] else ''}")
    if pstats is not None:
        lines.append(f"{'partitions':<28}{manifest['partitions']:>14}  ({manifest['partition_method']}; "
                     f"edge cut {100 * pstats['edge_cut_fraction']:.1f}%)")
    if seconds is not None:
        work = max(seconds - ray_seconds, 1e-9)
        lines.append(f"{'time':<28}{seconds:>13.1f}s  (Ray start-up {ray_seconds:.1f}s; "
                     f"{n0 / work:,.0f} input rows/s without it)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def cmd_prep(args) -> int:
    try:
        prep(args.interactions, parse_named_paths(args.item_features, "--item-features"), args.out, kcore=args.kcore, split=args.split,
             seed=args.seed, partitions=args.partitions, partition_method=args.partition_method,
             user_col=args.user_col, item_col=args.item_col, time_col=args.time_col,
             feature_col=args.feature_col, require_features=args.require_features, overwrite=args.overwrite,
             ray_address=args.ray_address)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``prep`` subcommand to an ``argparse`` subparsers object; returns the sub-parser."""
    p = subparsers.add_parser("prep", help="Ray job: raw Parquet logs + item features -> prepared dataset",
                              description=__doc__.splitlines()[0])
    p.add_argument("--interactions", required=True, metavar="PATH",
                   help="interaction log: Parquet file, directory or glob")
    p.add_argument("--item-features", action="append", required=True, metavar="NAME=PATH",
                   help="modality vectors: Parquet (item id + list column) or .npy with a <stem>.ids.parquet/.npy "
                        "sibling; repeat per modality (first = contrastive anchor)")
    p.add_argument("--out", required=True, metavar="DIR", help="prepared dataset directory to write")
    p.add_argument("--kcore", type=int, default=5, help="iterative k-core on users and items (default 5)")
    p.add_argument("--split", choices=SPLITS, default="mmrec", help="per-user split rule (default mmrec)")
    p.add_argument("--seed", type=int, default=999, help="seed of the mmrec split and random partitioning")
    p.add_argument("--partitions", type=int, default=1, metavar="P", help="graph partitions (default 1)")
    p.add_argument("--partition-method", choices=METHODS, default="metis")
    p.add_argument("--user-col", default="user_id")
    p.add_argument("--item-col", default="item_id")
    p.add_argument("--time-col", default="timestamp", help="timestamp column ('' if the log has none)")
    p.add_argument("--feature-col", default="embedding", help="vector column of the feature Parquet files")
    p.add_argument("--require-features", action="store_true",
                   help="refuse items without a feature vector instead of giving them the mean vector")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (default: $RAY_ADDRESS, else start a local one)")
    p.set_defaults(func=cmd_prep)
    return p


def main(argv=None) -> int:
    from lgmrec_dist.entry import run_subcommand
    return run_subcommand(register_cli, "prep", argv)


if __name__ == "__main__":
    sys.exit(main())
