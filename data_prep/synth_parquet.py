"""Synthetic *raw* catalogues: Parquet interaction logs and per-modality feature Parquet files.

This is the input side of ``lgmrec prep`` (data_prep/prep.py), the built-in dataset of the quickstart
(synth -> prep -> train -> evaluate). The planted structure comes from
:func:`data_prep.synthetic.generate_synthetic` (latent item clusters shared by the interactions and the
features, power-law user activity and item popularity); this module turns it into what a platform team
would have:

``DIR/interactions/part-00000.parquet ...``
    ``user_id`` (string), ``item_id`` (string), ``timestamp`` (int64, seconds) and an extra ``rating``
    column (float32; prep ignores it). Rows are in time order, about 2M rows per file. A small fraction of
    exact duplicate rows (``duplicate_rate``) and rows with a null user id (``null_rate``) can be mixed in
    to exercise prep's cleaning steps.
``DIR/features/<modality>.parquet``
    ``item_id`` (string) + ``embedding`` (fixed-size list<float32>[dim]), rows in random order;
    ``missing_feature_rate`` of the items can be left out (prep then fills them with the mean vector).
``DIR/truth.parquet``
    ``item_id`` + planted ``cluster`` (for analyses; prep does not read it).
``DIR/synth.json``
    the generation parameters and the file list.

Raw ids are strings: user ``u%07d`` / item ``i%07d`` of a random permutation of the dense ids, so
first-appearance order, id order and dense order all differ. Features are generated in chunks of items
(z @ W_m + noise, as in ``generate_synthetic``), so 10M interactions with a few hundred thousand items
and 384/512-d features stay within a few GB. The directory is written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError, atomic_directory
from data_prep.mmrec import check_modality_name
from data_prep.synthetic import FEATURE_NOISE, LATENT_DIM, generate_synthetic

__all__ = ["make_parquet_synthetic", "parse_modalities", "register_cli", "DEFAULT_PARQUET_MODALITIES"]

DEFAULT_PARQUET_MODALITIES = {"text": 384, "image": 512}
ROWS_PER_FILE = 2_000_000
FEATURE_CHUNK = 16_384
_FEATURE_SEED_OFFSET = 7_919           # feature streams differ from generate_synthetic's own


def parse_modalities(spec: str) -> dict[str, int]:
    """``"text:384,image:512"`` -> ``{"text": 384, "image": 512}`` (order kept)."""
    out: dict[str, int] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, dim = part.partition(":")
        if not sep or not dim.strip().isdigit() or int(dim) < 1:
            raise DatasetError(f"--modalities: expected NAME:DIM with a positive integer DIM, got {part!r}")
        check_modality_name(name, "--modalities")
        if name in out:
            raise DatasetError(f"--modalities: modality {name!r} given twice")
        out[name] = int(dim)
    if not out:
        raise DatasetError("--modalities: at least one NAME:DIM is required")
    return out


def _raw_ids(prefix: str, n: int, rng: np.random.Generator) -> pa.Array:
    """Distinct string ids for dense ids 0..n-1: ``prefix`` + zero-padded random permutation."""
    width = max(7, len(str(n - 1)))
    perm = rng.permutation(n)
    return pa.array([f"{prefix}{k:0{width}d}" for k in perm.tolist()], type=pa.string())


def _feature_matrix_chunks(item_latent: np.ndarray, dim: int, rng: np.random.Generator):
    """Yield (start, float32 chunk) of z @ W + noise, FEATURE_CHUNK items at a time."""
    W = rng.standard_normal((LATENT_DIM, dim)) / math.sqrt(LATENT_DIM)
    for start in range(0, len(item_latent), FEATURE_CHUNK):
        z = item_latent[start:start + FEATURE_CHUNK]
        x = z @ W + FEATURE_NOISE * rng.standard_normal((len(z), dim))
        yield start, x.astype(np.float32)


def make_parquet_synthetic(out: str | Path, num_users: int = 2000, num_items: int = 1000,
                           num_interactions: int = 40000, modalities: dict[str, int] | None = None,
                           seed: int = 0, *, duplicate_rate: float = 0.0, null_rate: float = 0.0,
                           missing_feature_rate: float = 0.0, num_clusters: int | None = None,
                           rows_per_file: int = ROWS_PER_FILE, overwrite: bool = False,
                           progress: bool = False) -> dict:
    """Write a raw synthetic catalogue (see the module docstring) to ``out``; return its description.

    ``num_interactions`` distinct (user, item) pairs are generated; duplicates and null-id rows are
    *added* on top (``round(rate * num_interactions)`` rows each). Deterministic given ``seed``.
    """
    modalities = dict(DEFAULT_PARQUET_MODALITIES if modalities is None else modalities)
    if not modalities:
        raise DatasetError("at least one modality is required")
    for name, dim in modalities.items():
        check_modality_name(name, "modalities")
        if int(dim) != dim or dim < 1:
            raise DatasetError(f"modality {name!r}: dimension must be a positive integer, got {dim!r}")
    for label, rate in (("duplicate_rate", duplicate_rate), ("null_rate", null_rate),
                        ("missing_feature_rate", missing_feature_rate)):
        if not 0.0 <= rate < 1.0:
            raise DatasetError(f"{label} must lie in [0, 1), got {rate}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise DatasetError(f"{out} already exists (pass --overwrite to replace it)")
    say = print if progress else (lambda *a, **k: None)

    try:
        data = generate_synthetic(num_users, num_items, num_interactions, {"latent": 1}, seed, num_clusters)
    except ValueError as exc:
        raise DatasetError(f"synth: {exc}") from None
    U, I, N = data["num_users"], data["num_items"], len(data["users"])
    say(f"[synth] generated {N:,} interactions over {U:,} users and {I:,} items")

    ss = np.random.SeedSequence([int(seed), _FEATURE_SEED_OFFSET])
    s_ids, s_rows, s_noise, s_feat = ss.spawn(4)
    rng = np.random.default_rng(s_ids)
    user_raw, item_raw = _raw_ids("u", U, rng), _raw_ids("i", I, rng)

    # raw log: time order (ties in random order), duplicates and null ids mixed in
    rng = np.random.default_rng(s_rows)
    order = np.lexsort((rng.random(N), data["timestamp"]))
    users, items, ts = data["users"][order], data["items"][order], data["timestamp"][order]
    rating = data["rating"][order].astype(np.float32)
    del data["users"], data["items"], data["split"], data["timestamp"], data["rating"]
    n_dup = int(round(duplicate_rate * N))
    n_null = int(round(null_rate * N))
    null_mask = None
    if n_dup or n_null:
        src = np.concatenate([np.arange(N), rng.integers(0, N, n_dup), rng.integers(0, N, n_null)])
        tag = np.concatenate([np.zeros(N, np.int8), np.ones(n_dup, np.int8), np.full(n_null, 2, np.int8)])
        # stable: an added row sits right after its source row, so the log stays in time order
        o = np.argsort(src, kind="stable")
        rows, tag = src[o], tag[o]
        users, items, ts, rating = users[rows], items[rows], ts[rows], rating[rows]
        null_mask = tag == 2 if n_null else None
        del src, tag, o, rows

    n_rows = len(users)
    n_files = max(1, math.ceil(n_rows / max(1, int(rows_per_file))))
    bounds = np.linspace(0, n_rows, n_files + 1).astype(np.int64)
    files = []
    with atomic_directory(out, overwrite) as tmp:
        (tmp / "interactions").mkdir()
        for f in range(n_files):
            a, b = int(bounds[f]), int(bounds[f + 1])
            uid = user_raw.take(pa.array(users[a:b]))
            if null_mask is not None and null_mask[a:b].any():
                uid = pc.if_else(pa.array(null_mask[a:b]), pa.scalar(None, pa.string()), uid)
            table = pa.table({"user_id": uid, "item_id": item_raw.take(pa.array(items[a:b])),
                              "timestamp": ts[a:b].astype(np.int64), "rating": rating[a:b]})
            name = f"interactions/part-{f:05d}.parquet"
            pq.write_table(table, tmp / name)
            files.append(name)
        say(f"[synth] wrote {n_rows:,} log rows in {n_files} file(s) "
            f"({n_dup:,} duplicates, {n_null:,} null user ids)")
        del users, items, ts, rating

        (tmp / "features").mkdir()
        rng = np.random.default_rng(s_noise)
        keep = np.ones(I, dtype=bool)
        n_missing = int(round(missing_feature_rate * I))
        if n_missing:
            keep[rng.choice(I, n_missing, replace=False)] = False
        feature_order = rng.permutation(I)                      # rows in random item order
        inverse = np.empty(I, dtype=np.int64)
        inverse[feature_order] = np.arange(I)
        latent = data["item_latent"][feature_order]
        ids_in_order = item_raw.take(pa.array(feature_order))
        keep_in_order = keep[feature_order]
        feature_files = {}
        for (name, dim), fss in zip(modalities.items(), s_feat.spawn(len(modalities))):
            path = f"features/{name}.parquet"
            schema = pa.schema([("item_id", pa.string()), ("embedding", pa.list_(pa.float32(), int(dim)))])
            with pq.ParquetWriter(tmp / path, schema) as writer:
                for start, x in _feature_matrix_chunks(latent, int(dim), np.random.default_rng(fss)):
                    stop = start + len(x)
                    sel = keep_in_order[start:stop]
                    vec = pa.FixedSizeListArray.from_arrays(pa.array(x[sel].ravel()), int(dim))
                    writer.write_table(pa.table({"item_id": ids_in_order.slice(start, stop - start).filter(
                        pa.array(sel)), "embedding": vec}, schema=schema))
            feature_files[name] = path
            say(f"[synth] wrote {path}: {int(keep.sum()):,} x {dim} float32")
        pq.write_table(pa.table({"item_id": item_raw, "cluster": data["item_cluster"]}), tmp / "truth.parquet")
        info = {
            "num_users": U, "num_items": I, "num_interactions": N, "log_rows": n_rows,
            "duplicates": n_dup, "null_user_ids": n_null, "missing_features": n_missing,
            "modalities": {k: int(v) for k, v in modalities.items()}, "seed": int(seed),
            "num_clusters": num_clusters, "interactions": "interactions", "interaction_files": files,
            "features": feature_files,
        }
        (tmp / "synth.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

def cmd_synth(args) -> int:
    try:
        mods = parse_modalities(args.modalities)
        info = make_parquet_synthetic(args.out, args.users, args.items, args.interactions, mods, args.seed,
                                      progress=True)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"wrote {out}")
    print(f"  interactions: {out / 'interactions'}  ({info['log_rows']:,} rows)")
    for name, path in info["features"].items():
        print(f"  --item-features {name}={out / path}")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add the ``synth`` subcommand to an ``argparse`` subparsers object; returns the sub-parser."""
    s = subparsers.add_parser("synth", help="synthetic raw catalogue: Parquet logs + feature Parquet per modality",
                              description=__doc__.splitlines()[0])
    s.add_argument("--users", type=int, required=True, help="number of users")
    s.add_argument("--items", type=int, required=True, help="number of items")
    s.add_argument("--interactions", type=int, required=True, help="number of distinct interactions")
    s.add_argument("--out", required=True, help="output directory (must not exist)")
    s.add_argument("--modalities", default="text:384,image:512", help="NAME:DIM,... (default text:384,image:512)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)
    return s


def main(argv=None) -> int:
    from lgmrec_dist.entry import run_subcommand
    return run_subcommand(register_cli, "synth", argv)


if __name__ == "__main__":
    sys.exit(main())
