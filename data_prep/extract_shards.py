"""The files of ``lgmrec extract``: the shard plan, the finished shards in ``OUT.partial/`` and the final
output, each written through :func:`lgmrec_dist.dataset.atomic_file` (docs/extract.md, "Resuming").
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError, atomic_file

META_KEY = b"lgmrec.extract"


def plan_shards(files: list[Path], shard_size: int) -> list[dict]:
    """Contiguous row ranges, in input order. A shard never crosses a file; small row groups are grouped
    up to ``shard_size`` rows, large ones split (a split row group is read once per piece)."""
    shards, start = [], 0
    for fi, f in enumerate(files):
        md = pq.ParquetFile(f).metadata
        groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        pending_rgs, pending_rows = [], 0

        def flush(fi=fi):
            nonlocal start, pending_rgs, pending_rows
            if pending_rows:
                shards.append({"file": fi, "row_groups": pending_rgs, "offset": 0, "length": pending_rows,
                               "start": start})
                start += pending_rows
            pending_rgs, pending_rows = [], 0

        for rg, n in enumerate(groups):
            if n == 0:
                continue
            if n > shard_size:
                flush()
                pieces = math.ceil(n / shard_size)
                for p in range(pieces):
                    lo, hi = n * p // pieces, n * (p + 1) // pieces
                    shards.append({"file": fi, "row_groups": [rg], "offset": lo, "length": hi - lo, "start": start})
                    start += hi - lo
                continue
            if pending_rows + n > shard_size:
                flush()
            pending_rgs.append(rg)
            pending_rows += n
        flush()
    for k, s in enumerate(shards):
        s["shard"] = k
    return shards


def embedding_array(emb: np.ndarray) -> pa.FixedSizeListArray:
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1])


def shard_path(work: Path, k: int) -> Path:
    return work / f"shard-{k:06d}.parquet"


def finished_shards(work: Path, shards: list[dict]) -> set[int]:
    done = set()
    for s in shards:
        p = shard_path(work, s["shard"])
        if p.is_file():
            try:
                if pq.ParquetFile(p).metadata.num_rows == s["length"]:
                    done.add(s["shard"])
                    continue
            except Exception:
                pass
            p.unlink()  # unreadable or wrong length: redo it
    for tmp in work.glob(".shard-*.tmp"):
        tmp.unlink()
    return done


def finalize(work: Path, shards: list[dict], out: Path, cfg, meta: dict,
              log: Callable[[str], None]) -> dict:
    """Concatenate the shards into ``out`` (temporary sibling, then rename); unreadable rows get the
    mean vector or are dropped."""
    image = cfg.image_col is not None
    total, bad, bad_ids, dim, mean = 0, 0, [], None, None
    if image:
        acc, good = None, 0
        for s in shards:
            t = pq.read_table(shard_path(work, s["shard"]))
            ok = t.column("ok").to_numpy(zero_copy_only=False)
            emb = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1)
            acc = np.zeros(emb.shape[1], np.float64) if acc is None else acc
            acc += emb[ok].sum(0, dtype=np.float64)
            good += int(ok.sum())
            if (~ok).any():
                bad += int((~ok).sum())
                if len(bad_ids) < 5:
                    bad_ids.extend(t.column(cfg.id_col).filter(pa.array(~ok)).to_pylist()[:5 - len(bad_ids)])
        if good == 0:
            raise DatasetError(f"none of the {sum(s['length'] for s in shards)} images in column "
                               f"{cfg.image_col!r} could be read (check the paths / --image-root)")
        mean = (acc / good).astype(np.float32)
    with atomic_file(out) as tmp:  # also over an existing file (--overwrite)
        writer = None
        try:
            for s in shards:
                t = pq.read_table(shard_path(work, s["shard"]))
                ids, embcol = t.column(cfg.id_col), t.column("embedding").combine_chunks()
                if image:
                    ok = t.column("ok").to_numpy(zero_copy_only=False)
                    if not ok.all():
                        if cfg.image_missing == "drop":
                            ids, embcol = ids.filter(pa.array(ok)), embcol.filter(pa.array(ok))
                        else:
                            emb = np.asarray(embcol.flatten()).reshape(t.num_rows, -1).copy()
                            emb[~ok] = mean
                            embcol = embedding_array(emb)
                dim = embcol.type.list_size
                table = pa.table({cfg.id_col: ids, "embedding": embcol})
                if writer is None:
                    info = dict(meta, dim=dim)
                    schema = table.schema.with_metadata({META_KEY: json.dumps(info).encode()})
                    writer = pq.ParquetWriter(tmp, schema)
                writer.write_table(table.cast(writer.schema))
                total += table.num_rows
        finally:
            if writer is not None:
                writer.close()
    if bad:
        how = "given the mean vector" if cfg.image_missing == "mean" else "dropped"
        log(f"extract: {bad} unreadable images {how} (e.g. ids {', '.join(repr(i) for i in bad_ids)})")
    return {"rows": total, "dim": dim, "unreadable": bad,
            "dropped": bad if image and cfg.image_missing == "drop" else 0}



def write_shard(work: Path, k: int, table: pa.Table) -> None:
    """Shard ``k`` into ``work``: a reader of the directory sees it whole or not at all."""
    with atomic_file(shard_path(work, k)) as tmp:
        pq.write_table(table, tmp)
