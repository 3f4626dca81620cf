"""Checkpoints, exact resume and the run-directory lock.

Layout::

    RUNDIR/checkpoints/step-<step>-<phase>/rank-<r>.pt   one file per rank (model shard, optimizer, loop state)
    RUNDIR/checkpoints/step-<step>-<phase>/meta.json     written last: sha256 per rank file, world size,
                                                          config and dataset digests
    RUNDIR/best/                                          the model at the best-validation epoch (same layout)

A checkpoint directory is built under a temporary name and renamed into place after every rank's file
is written and synced, so a crash leaves either the complete previous checkpoint or the new one.
Files are read with ``torch.load(weights_only=True)``: tensors and plain Python values only, never
arbitrary pickle. ``phase`` is 0 for a checkpoint taken after a step and 1 for one taken after the
epoch's evaluation (it sorts after the step checkpoint of the same step).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lgmrec_dist.config import Config
from lgmrec_dist.dataset import atomic_write_json, sha256_file
from lgmrec_dist.errors import UserError

# keys that may change between an interrupted run and its resumption without changing the mathematics
RESUME_FREE_KEYS = {"epochs", "max_steps", "stopping_step", "device", "num_threads", "deterministic",
                    "eval_batch_size", "eval_item_tile", "checkpoint_every_steps", "checkpoint_every_epoch",
                    "keep_checkpoints"}


class CheckpointError(UserError, RuntimeError):
    pass


def config_digest(cfg: Config) -> str:
    d = {k: v for k, v in cfg.to_dict().items() if k not in RESUME_FREE_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def dataset_digest(manifest: dict) -> str:
    return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _WriteErrors:
    """A file object for ``torch.save`` that keeps the OSError of a failed write: torch reports a full
    disk as an "unexpected pos" RuntimeError of its zip writer, so the real reason is kept to re-raise."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data):
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        self.fh.flush()


def save_file(path: Path, payload) -> None:
    """``torch.save`` to ``path``, synced; a failed write raises its OSError (ENOSPC, EDQUOT) naming ``path``."""
    with open(path, "wb", buffering=0) as raw:
        fh = _WriteErrors(raw)
        try:
            torch.save(payload, fh)
            os.fsync(raw.fileno())
        except (RuntimeError, OSError) as exc:
            err = fh.error or (exc if isinstance(exc, OSError) else None)
            if err is None or err.errno is None:
                raise
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from None


def write_sharded(target: Path, payload: dict, meta: dict) -> None:
    """Every rank writes its payload into a temporary sibling of ``target``; rank 0 seals and renames it."""
    rank, world = _rank_world()
    tmp = target.parent / f".{target.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        save_file(tmp / f"rank-{rank}.pt", payload)
    except OSError:
        if world == 1:  # with several ranks, rank 0 removes it at the next start-up (remove_stale)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()
    if rank == 0:
        meta = {**meta, "world_size": world,
                "files": {f"rank-{r}.pt": sha256_file(tmp / f"rank-{r}.pt") for r in range(world)}}
        atomic_write_json(tmp / "meta.json", meta)
        _fsync_dir(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        _fsync_dir(target.parent)
    _barrier()


def read_sharded(path: Path, rank: int | None = None, *, cfg_digest: str | None = None,
                 data_digest: str | None = None, world_size: int | None = None) -> dict:
    """Verify ``path`` (meta.json, checksums, digests) and load one rank's payload (this rank's by default)."""
    meta = check_meta(path, cfg_digest=cfg_digest, data_digest=data_digest, world_size=world_size)
    rank = _rank_world()[0] if rank is None else rank
    name = f"rank-{rank}.pt"
    fpath = path / name
    if not fpath.is_file() or sha256_file(fpath) != meta["files"].get(name):
        raise CheckpointError(f"{fpath}: missing, truncated or corrupt (checksum does not match meta.json)")
    try:
        return torch.load(fpath, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means a bad file
        raise CheckpointError(f"{fpath}: cannot be read ({exc})") from None


def check_meta(path: Path, *, cfg_digest: str | None = None, data_digest: str | None = None,
               world_size: int | None = None) -> dict:
    """``path``'s meta.json, after checking that it matches this run's world size, config and dataset."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
    if world_size is not None and meta["world_size"] != world_size:
        raise CheckpointError(f"{path} was written by {meta['world_size']} ranks; this run has {world_size}. "
                              f"Resume with --nproc_per_node {meta['world_size']}")
    if cfg_digest is not None and meta.get("config_digest") != cfg_digest:
        raise CheckpointError(f"{path} was written with a different configuration (digest "
                              f"{meta.get('config_digest')} vs {cfg_digest}); only {sorted(RESUME_FREE_KEYS)} may change")
    if data_digest is not None and meta.get("dataset_digest") != data_digest:
        raise CheckpointError(f"{path} was written for a different dataset (digest {meta.get('dataset_digest')} "
                              f"vs {data_digest})")
    return meta


def read_meta(path: Path) -> dict:
    return json.loads((path / "meta.json").read_text())


def read_best_tables(run_dir: str | Path) -> tuple[dict, dict]:
    """(meta, tables) of RUNDIR/best/: every rank's rows put in place by id — ``user_embedding``,
    ``item_embedding`` (full tables) and ``dense`` (W_m, V_m by name)."""
    best = Path(run_dir) / "best"
    if not (best / "meta.json").is_file():
        raise CheckpointError(f"{run_dir}: no best model (RUNDIR/best/meta.json); has an epoch finished?")
    meta = read_meta(best)
    parts = [read_sharded(best, rank) for rank in range(meta["world_size"])]
    tables = {}
    for kind in ("user", "item"):
        ids = torch.cat([p[f"{kind}_ids"] for p in parts])
        rows = torch.cat([p[f"{kind}_embedding"] for p in parts])
        table = torch.empty(int(ids.max()) + 1 if len(ids) else 0, rows.shape[1], dtype=rows.dtype)
        table[ids] = rows
        tables[f"{kind}_embedding"] = table
    tables["dense"] = parts[-1]["dense"]
    return meta, tables


def read_best_rows(run_dir: str | Path, user_ids: np.ndarray, item_ids: np.ndarray) -> dict:
    """The rows ``user_ids`` / ``item_ids`` (sorted) of RUNDIR/best/ and its dense parameters, without
    putting whole tables together: each rank's file is read in turn and only the asked rows are kept
    (a process that holds only its partition's rows, e.g. a partitioned export)."""
    best = Path(run_dir) / "best"
    if not (best / "meta.json").is_file():
        raise CheckpointError(f"{run_dir}: no best model (RUNDIR/best/meta.json); has an epoch finished?")
    meta = read_meta(best)
    want = {"user": np.asarray(user_ids, np.int64), "item": np.asarray(item_ids, np.int64)}
    out, found = {}, {kind: np.zeros(len(ids), bool) for kind, ids in want.items()}
    for rank in range(meta["world_size"]):
        part = read_sharded(best, rank)
        out["dense"] = part["dense"]
        for kind, ids in want.items():
            have = part[f"{kind}_ids"].numpy()
            rows = out.setdefault(f"{kind}_embedding",
                                  torch.empty(len(ids), part[f"{kind}_embedding"].shape[1]))
            at = np.searchsorted(ids, have)
            hit = at < len(ids)
            hit[hit] = ids[at[hit]] == have[hit]
            rows[torch.from_numpy(at[hit])] = part[f"{kind}_embedding"][torch.from_numpy(np.flatnonzero(hit))]
            found[kind][at[hit]] = True
    for kind, ok in found.items():
        if not ok.all():
            raise CheckpointError(f"{best}: {int((~ok).sum())} {kind} rows are in none of its rank files")
    return out


class Checkpointer:
    """Writes step/epoch checkpoints and the best model, keeps the last K, finds the latest."""

    def __init__(self, run_dir: Path, cfg: Config, manifest: dict, dataset_path: str | Path = ""):
        self.dir = Path(run_dir) / "checkpoints"
        self.best_dir = Path(run_dir) / "best"
        self.cfg = cfg
        self.meta = {"config_digest": config_digest(cfg), "dataset_digest": dataset_digest(manifest),
                     "dataset_path": str(Path(dataset_path).resolve()) if dataset_path else ""}

    def latest(self) -> Path | None:
        done = sorted(p for p in self.dir.glob("step-*") if (p / "meta.json").is_file()) if self.dir.exists() else []
        return done[-1] if done else None

    def save(self, payload: dict, step: int, phase: int) -> Path:
        target = self.dir / f"step-{step:010d}-{phase}"
        write_sharded(target, payload, {**self.meta, "step": step, "phase": phase})
        rank, _ = _rank_world()
        if rank == 0:
            done = sorted(p for p in self.dir.glob("step-*") if (p / "meta.json").is_file())
            for old in done[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return target

    def save_best(self, model_payload: dict, epoch: int) -> None:
        write_sharded(self.best_dir, model_payload, {**self.meta, "epoch": epoch})

    def load(self, path: Path) -> dict:
        _, world = _rank_world()
        return read_sharded(path, cfg_digest=self.meta["config_digest"], data_digest=self.meta["dataset_digest"],
                            world_size=world)

    def check(self, path: Path, world_size: int) -> None:
        """Refuse a checkpoint this run could not resume (world size, config, dataset), reading meta.json only."""
        check_meta(path, cfg_digest=self.meta["config_digest"], data_digest=self.meta["dataset_digest"],
                   world_size=world_size)

    def remove_stale(self) -> None:
        """Remove what interrupted writes left (``.step-*.tmp``, ``.best.tmp``, ``.*.old``, JSON temporaries);
        called by rank 0 holding the run lock, so no other writer is active."""
        run_dir = self.best_dir.parent
        for pattern in (".step-*.tmp", ".step-*.old"):
            for p in self.dir.glob(pattern) if self.dir.is_dir() else ():
                shutil.rmtree(p, ignore_errors=True)
        for p in [*run_dir.glob(".best.tmp"), *run_dir.glob(".best.old"), *run_dir.glob(".*.json.*.tmp")]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


class RunLock:
    """An exclusive lock on RUNDIR held by rank 0 for the whole run (released when the process dies)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.fh = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.close()
            self.fh = None
            raise CheckpointError(f"{self.path.parent} is in use by another training run (lock {self.path})") from None
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None
