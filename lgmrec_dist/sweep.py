"""Hyperparameter sweeps as Ray Tune trials, selected on VALIDATION (never on test).

    lgmrec sweep --config configs/baby.yaml --data prepared/baby --out sweeps/baby \\
        --grid learning_rate=0.0005,0.001 --grid cl_weight=1e-4,1e-3 [--set epochs=200 ...]

Runs the Cartesian product of the ``--grid`` values (each value a YAML scalar) on top of ``--config``
and ``--set``, one Ray Tune trial per combination. Each trial calls ``lgmrec_dist.train.train`` in
its Tune trial actor: the actor is a process of its own (``reuse_actors=False``: a fresh one per
trial), so the per-process state that ``train`` sets (torch threads, deterministic mode, the logger)
never leaks between trials, and there is no second interpreter start-up and no result file to
parse, as a subprocess would need. A trial writes a normal run directory,
``OUT/trials/<trial>/`` (metrics.json, epochs.jsonl, tb/, report.md, checkpoints).

Selection: the combination with the highest **validation** Recall@20 (``--metric``; the value
``train`` reports for its best-validation epoch), ties to the first in grid order. The test metrics
are never consulted for the choice: MMRec's own grid search picks the combination with the best
test score, which reports an optimistically biased number. The test metrics of the selected run are
reported beside the whole table (valid and test of every trial) in ``OUT/sweep.md`` and
``OUT/sweep.json``, and printed.

Concurrency: each trial reserves ``--cpus-per-trial`` CPUs and ``--gpus-per-trial`` GPUs. When this
command starts its own local Ray (a laptop), trials run one after another (``--max-concurrent 1``);
connected to a cluster (``--address``, ``RAY_ADDRESS`` as ``ray job submit`` sets it, or an already
initialised Ray) as many run in parallel as the cluster's resources allow. ``OUT`` must be reachable by
every node that runs trials (a shared filesystem on a cluster); Tune's own state is in ``OUT/tune``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import yaml

from lgmrec_dist.errors import UserError

SUMMARY = "sweep.json"
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


class SweepError(UserError, ValueError):
    pass


# ------------------------------------------------------------------------------------------- the grid

def _scalar(raw: str):
    """A YAML scalar, with YAML 1.1's gap closed: ``1e-4`` (no dot) is a float, not the string '1e-4'."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        return float(value)
    return value


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["lr=0.1,0.2", "use_mge=true,false"]`` -> ``{"lr": [0.1, 0.2], "use_mge": [True, False]}``."""
    grid: dict[str, list] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SweepError(f"--grid expects key=v1,v2,..., got {item!r}")
        if key in grid:
            raise SweepError(f"--grid {key} given twice")
        values = [_scalar(v) for v in raw.split(",")]
        if any(v is None for v in values):
            raise SweepError(f"--grid {key}: empty value in {raw!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"--grid {key}: repeated value in {raw!r}")
        grid[key] = values
    if not grid:
        raise SweepError("give at least one --grid key=v1,v2,...")
    return grid


def parse_sets(items: list[str]) -> dict:
    """``--set key=value`` items, values read like the grid's (so ``cl_weight=1e-4`` is a float)."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = _scalar(raw) if raw.strip() else ""
    return out


def combinations(grid: dict[str, list]) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def trial_name(index: int, params: dict) -> str:
    body = "_".join(f"{k}={v}" for k, v in params.items())
    body = re.sub(r"[^A-Za-z0-9_.=+-]", "-", body)[:80]
    return f"t{index:03d}_{body}"


# -------------------------------------------------------------------------------------- selection

def _score(trial: dict, metric: str):
    if trial.get("status") != "ok":
        return None
    v = (trial.get("valid") or {}).get(metric)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return None
    return float(v)


def select_best(trials: list[dict], metric: str = "recall@20") -> int | None:
    """Index of the trial with the highest VALIDATION ``metric``; ties go to the first in grid order.

    Only ``trial["valid"]`` is read: ``trial["test"]`` never influences the choice.
    """
    best, best_v = None, None
    for i, t in enumerate(trials):
        v = _score(t, metric)
        if v is not None and (best_v is None or v > best_v):
            best, best_v = i, v
    return best


def summarise(trials: list[dict], grid: dict, metric: str = "recall@20", **info) -> dict:
    i = select_best(trials, metric)
    selected = None if i is None else {k: trials[i].get(k) for k in
                                       ("index", "name", "params", "run_dir", "best_epoch", "valid", "test")}
    # what a test-based pick (MMRec's grid search) would have chosen: shown, never used
    by_test = [(t["test"].get(metric), j) for j, t in enumerate(trials)
               if t.get("status") == "ok" and isinstance((t.get("test") or {}).get(metric), (int, float))]
    test_pick = max(by_test, key=lambda x: (x[0], -x[1]))[1] if by_test else None
    return {"selection": {"split": "valid", "metric": metric,
                          "rule": f"highest validation {metric} at each trial's best-validation epoch; ties to the "
                                  "first in grid order; test metrics are not consulted"},
            "grid": grid, **info, "trials": trials, "selected": selected,
            "test_based_pick_not_used": None if test_pick is None else trials[test_pick].get("name")}


def _ks(*splits: dict) -> list[int]:
    return sorted({int(k.split("@")[1]) for m in splits for k in m if "@" in k and k.split("@")[1].isdigit()})


def render_markdown(summary: dict) -> str:
    from lgmrec_dist.report import _cfg, _fmt, md_table, metrics_table

    metric, grid = summary["selection"]["metric"], summary["grid"]
    sel = summary.get("selected")
    header = ["trial"] + list(grid) + ["status", "best epoch", f"valid {metric}", "valid ndcg@20",
                                       f"test {metric}", "test ndcg@20", "selected"]
    rows = []
    for t in summary["trials"]:
        v, te = t.get("valid") or {}, t.get("test") or {}
        rows.append([t["name"]] + [_cfg(t["params"].get(k)) for k in grid]
                    + [t.get("status"), _fmt(t.get("best_epoch")), _fmt(v.get(metric)), _fmt(v.get("ndcg@20")),
                       _fmt(te.get(metric)), _fmt(te.get("ndcg@20")),
                       "**yes**" if sel and t["index"] == sel["index"] else ""])
    parts = ["# Sweep", "", f"Selection: {summary['selection']['rule']}.", "",
             md_table(header, rows), ""]
    if sel:
        params = ", ".join(f"`{k}={v}`" for k, v in sel["params"].items())
        parts += [f"## Selected: {sel['name']} ({params})", "",
                  f"Run directory `{sel['run_dir']}`; validation {metric} {_fmt(sel['valid'].get(metric))}.", "",
                  "Metrics of the selected run at its best-validation epoch (test beside valid):", "",
                  metrics_table(sel["valid"], sel["test"], _ks(sel["valid"], sel["test"])), ""]
        other = summary.get("test_based_pick_not_used")
        if other and other != sel["name"]:
            parts += [f"Note: picking on test (as MMRec's grid search does) would have chosen {other}; its test "
                      "score is an optimistically biased estimate and is not the sweep's result.", ""]
    else:
        parts += ["No trial finished: nothing selected.", ""]
    return "\n".join(parts)


# -------------------------------------------------------------------------------------- the trials

class _DropTensorboardXWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "TensorboardX logger cannot be instantiated" not in record.getMessage()


def _run_trial(config: dict) -> None:
    """One Tune trial: train one combination in this (fresh) trial actor and report its metrics."""
    from ray import tune

    from lgmrec_dist.config import load_config
    from lgmrec_dist.train import train

    s = config["sweep"]
    params = config["params"]
    cfg = load_config(s["config"], {**s["overrides"], **params["values"]})
    run_dir = Path(s["trials_dir"]) / params["name"]
    metrics = train(s["data"], cfg, run_dir, overwrite=True)
    tune.report({"valid": metrics["valid"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
                 "epochs_run": metrics["epochs_run"], "seconds_per_epoch": metrics["seconds_per_epoch"],
                 "run_dir": str(run_dir), f"valid_{s['metric']}": metrics["valid"].get(s["metric"])})


def run_sweep(data: str | Path, config: str | Path | None, grid: dict, out: str | Path, overrides: dict | None = None,
              metric: str = "recall@20", max_concurrent: int | None = None, cpus_per_trial: float = 1,
              gpus_per_trial: float = 0, storage_path: str | None = None, verbose: int = 1) -> dict:
    """Run the grid as Ray Tune trials on the connected Ray (``ray.init`` done) and write the summary."""
    from ray import tune

    from lgmrec_dist.config import ConfigError, load_config
    from lgmrec_dist.dataset import atomic_write_json

    overrides = parse_sets(overrides) if isinstance(overrides, list) else dict(overrides or {})
    combos = combinations(grid)
    for combo in combos:  # refuse a bad key or value before any trial starts
        try:
            cfg = load_config(config, {**overrides, **combo})
        except ConfigError as exc:
            raise SweepError(f"combination {combo}: {exc}") from None
    metric_name, _, k = metric.partition("@")
    if metric_name not in ("recall", "ndcg", "precision", "map") or not k.isdigit() or int(k) not in cfg.topk:
        raise SweepError(f"--metric: expected e.g. recall@20 with K in topk {cfg.topk}, got {metric!r}")
    out = Path(out).resolve()
    trials_dir = out / "trials"
    trials_dir.mkdir(parents=True, exist_ok=True)
    names = [trial_name(i, c) for i, c in enumerate(combos)]
    static = {"data": str(Path(data).resolve()), "config": str(Path(config).resolve()) if config else None,
              "overrides": overrides, "trials_dir": str(trials_dir), "metric": metric}
    space = {"sweep": static,
             "params": tune.grid_search([{"index": i, "name": n, "values": c}
                                         for i, (n, c) in enumerate(zip(names, combos))])}
    resources = {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial else {})}
    tuner = tune.Tuner(
        tune.with_resources(_run_trial, resources),
        param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent or None, reuse_actors=False,
                                    trial_dirname_creator=lambda trial: trial.config["params"]["name"]),
        run_config=tune.RunConfig(name="tune", storage_path=storage_path or str(out), verbose=verbose),
    )
    # Tune's optional TensorBoardX result logger is absent (each trial writes its own TensorBoard files in
    # RUNDIR/tb); drop Tune's warning about it so that it does not read as "TensorBoard is broken"
    tune_log, quiet = logging.getLogger("ray.tune.utils.callback"), _DropTensorboardXWarning()
    tune_log.addFilter(quiet)
    t0 = time.perf_counter()
    try:
        results = tuner.fit()
    finally:
        tune_log.removeFilter(quiet)
    seconds = time.perf_counter() - t0

    trials = [None] * len(combos)
    for res in results:
        p = res.config["params"]
        m = res.metrics or {}
        row = {"index": p["index"], "name": p["name"], "params": p["values"],
               "run_dir": m.get("run_dir", str(trials_dir / p["name"]))}
        if res.error is None and "valid" in m:
            row.update(status="ok", error=None, best_epoch=m.get("best_epoch"), epochs_run=m.get("epochs_run"),
                       seconds_per_epoch=m.get("seconds_per_epoch"), valid=m["valid"], test=m["test"])
        else:
            row.update(status="error", error=f"{type(res.error).__name__}: {res.error}" if res.error else "no result",
                       valid={}, test={})
        trials[p["index"]] = row
    for i, row in enumerate(trials):  # a trial Tune never ran
        if row is None:
            trials[i] = {"index": i, "name": names[i], "params": combos[i], "run_dir": str(trials_dir / names[i]),
                         "status": "error", "error": "not run", "valid": {}, "test": {}}
    summary = summarise(trials, grid, metric, data=static["data"], config=static["config"], overrides=overrides,
                        seconds=seconds)
    atomic_write_json(out / SUMMARY, summary)
    (out / "sweep.md").write_text(render_markdown(summary))
    return summary


# ---------------------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="base YAML config (configs/*.yaml)")
    p.add_argument("--grid", action="append", default=[], required=True, metavar="KEY=V1,V2,...",
                   help="values of one config key; repeat for more keys (the Cartesian product is run)")
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--out", required=True, help="sweep directory: trials/<trial>/ run dirs, sweep.json, sweep.md")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fixed override for every trial")
    p.add_argument("--metric", default="recall@20", help="VALIDATION metric that selects the combination (recall@20)")
    p.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (default: 1 on a local Ray this command starts, else the cluster's resources)")
    p.add_argument("--cpus-per-trial", type=float, default=1)
    p.add_argument("--gpus-per-trial", type=float, default=0)
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--storage-path", default=None, help="Ray Tune storage (default: OUT; e.g. a shared path)")


def cmd_sweep(args) -> int:
    import os

    from lgmrec_dist.config import ConfigError
    from lgmrec_dist.report import _fmt

    try:
        grid = parse_grid(args.grid)
        for flag, value, low in (("--max-concurrent", args.max_concurrent, 1), ("--cpus-per-trial", args.cpus_per_trial, 0),
                                 ("--gpus-per-trial", args.gpus_per_trial, 0)):
            if value is not None and not value >= low:  # not >=: also refuses nan
                raise SweepError(f"{flag}: must be >= {low}, got {value}")
    except SweepError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import ray

    max_concurrent = args.max_concurrent
    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        ray.init(address=address)
        if max_concurrent is None and not address:
            max_concurrent = 1  # a laptop: one trial after another, each with the whole machine
    try:
        summary = run_sweep(args.data, args.config, grid, args.out, overrides=args.set, metric=args.metric,
                            max_concurrent=max_concurrent, cpus_per_trial=args.cpus_per_trial,
                            gpus_per_trial=args.gpus_per_trial, storage_path=args.storage_path)
    except (SweepError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render_markdown(summary))
    print(f"wrote {Path(args.out) / SUMMARY} and {Path(args.out) / 'sweep.md'}", file=sys.stderr)
    sel = summary["selected"]
    if sel is None:
        print("error: no trial finished", file=sys.stderr)
        return 1
    print(f"selected {sel['name']} on valid {args.metric} {_fmt(sel['valid'].get(args.metric))}: "
          f"test {args.metric} {_fmt(sel['test'].get(args.metric))}", file=sys.stderr)
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sweep", help="grid search as Ray Tune trials, selected on validation",
                              description=__doc__.splitlines()[0])
    add_arguments(p)
    p.set_defaults(func=cmd_sweep)
    return p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lgmrec_dist.sweep", description=__doc__.splitlines()[0])
    add_arguments(p)
    return cmd_sweep(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
