"""Run reports: ``RUNDIR/report.md`` with PNG plots, and a side-by-side comparison of runs.

    lgmrec report RUNDIR                       # (re)write RUNDIR/report.md + plots, print the summary
    lgmrec report RUNA RUNB ... [--out F.md]   # compare runs: config differences and metrics side by side

A run report is built from the files a run leaves: ``epochs.jsonl`` (one record per epoch),
``metrics.json`` (metrics at the best-validation epoch) and ``config.yaml``. Plots (matplotlib, Agg
backend, no display needed) go to ``RUNDIR/plots/``: ``loss.png`` (the loss and its terms BPR, HCL
and reg per epoch) and ``valid.png`` (validation Recall@20 and NDCG@20 per epoch, best epoch marked).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

LOSS_TERMS = (("loss", "total loss"), ("bpr", "BPR"), ("hcl", "HCL (contrastive, unweighted)"),
              ("reg", "regulariser (unweighted)"))
METRIC_NAMES = ("recall", "ndcg", "precision", "map")


@dataclass
class Run:
    path: Path
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def best_epoch(self):
        b = self.metrics.get("best_epoch")
        if b is None:
            bests = [r["epoch"] for r in self.epochs if r.get("best")]
            b = bests[-1] if bests else None
        return b

    def topk(self) -> list[int]:
        ks = self.config.get("topk")
        if ks:
            return list(ks)
        found = sorted({int(k.split("@")[1]) for k in self.metrics.get("valid", {}) if "@" in k})
        return found or [20]


def load_run(run_dir: str | Path, metrics: dict | None = None) -> Run:
    """Read a run directory; ``metrics`` (when given) stands in for a missing metrics.json."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run directory")
    run = Run(path)
    if (path / "metrics.json").is_file():
        run.metrics = json.loads((path / "metrics.json").read_text())
    elif metrics is not None:
        run.metrics = dict(metrics)
    if (path / "config.yaml").is_file():
        run.config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if (path / "epochs.jsonl").is_file():
        for line in (path / "epochs.jsonl").read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    run.epochs.append(json.loads(line))
                except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                    break
    if not run.metrics and not run.epochs:
        raise FileNotFoundError(f"{path}: neither metrics.json nor epochs.jsonl (not a run directory?)")
    return run


# ---------------------------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write the PNG (making its folder) and free the figure."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_losses(run: Run, path: Path) -> Path:
    """One panel per loss term (they differ by orders of magnitude), epoch means."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    epochs = [r["epoch"] for r in run.epochs]
    best = run.best_epoch
    for ax, (key, label) in zip(axes.flat, LOSS_TERMS):
        ys = [(r.get("train") or {}).get(key, float("nan")) for r in run.epochs]
        ax.plot(epochs, ys, marker="o", markersize=3, color="tab:blue")
        if best is not None and best in epochs:
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1, alpha=0.6)
        ax.set_title(label)
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(f"{run.name}: training loss terms per epoch (epoch means; dashed = best epoch)")
    return _save(plt, fig, path)


def plot_validation(run: Run, path: Path, metrics=("recall@20", "ndcg@20")) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.8))
    axes = [axes] if len(metrics) == 1 else list(axes)
    epochs = [r["epoch"] for r in run.epochs]
    best = run.best_epoch
    for ax, metric in zip(axes, metrics):
        ys = [(r.get("valid") or {}).get(metric, float("nan")) for r in run.epochs]
        ax.plot(epochs, ys, marker="o", markersize=3, color="tab:green", label=f"valid {metric}")
        if best is not None and best in epochs:
            yb = ys[epochs.index(best)]
            ax.axvline(best, color="tab:red", linestyle="--", linewidth=1, alpha=0.6)
            ax.plot([best], [yb], marker="*", markersize=14, color="tab:red", linestyle="none",
                    label=f"best epoch {best}: {yb:.4f}")
        ax.set_xlabel("epoch")
        ax.set_title(f"validation {metric}")
        ax.grid(alpha=0.3)
        _integer_epochs(ax)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{run.name}: validation per epoch")
    return _save(plt, fig, path)


def plot_compare(runs: list[Run], labels: list[str], path: Path, metric: str = "recall@20") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, label in zip(runs, labels):
        xs = [r["epoch"] for r in run.epochs]
        ax.plot(xs, [(r.get("valid") or {}).get(metric, float("nan")) for r in run.epochs], marker="o",
                markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"valid {metric}")
    ax.grid(alpha=0.3)
    _integer_epochs(ax)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


# ------------------------------------------------------------------------------------------- tables

def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{digits}f}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x, digits) for x in v) + "]"
    return str(v)


def _cfg(v) -> str:
    """A configuration value as written in YAML (1e-4, not 0.000100)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_cfg(x) for x in v) + "]"
    return "–" if v is None else str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    cells = [[str(c).replace("|", "\\|") for c in row] for row in [header] + rows]
    lines = ["| " + " | ".join(cells[0]) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells[1:]]
    return "\n".join(lines)


def metrics_table(valid: dict, test: dict, ks: list[int]) -> str:
    """Metrics at the best-validation epoch: one row per metric, valid @K then test @K."""
    header = ["metric"] + [f"valid @{k}" for k in ks] + [f"test @{k}" for k in ks]
    rows = [[name] + [_fmt((valid or {}).get(f"{name}@{k}")) for k in ks]
            + [_fmt((test or {}).get(f"{name}@{k}")) for k in ks] for name in METRIC_NAMES]
    return md_table(header, rows)


def epochs_table(run: Run, metric: str = "recall@20") -> str:
    header = ["epoch", "steps", "loss", "bpr", "hcl", "reg", f"valid {metric}", "valid ndcg@20", "s/epoch",
              "samples/s", "best"]
    rows = []
    for r in run.epochs:
        t, v = r.get("train") or {}, r.get("valid") or {}
        rows.append([r.get("epoch"), r.get("step"), _fmt(t.get("loss")), _fmt(t.get("bpr")), _fmt(t.get("hcl")),
                     _fmt(t.get("reg")), _fmt(v.get(metric)), _fmt(v.get("ndcg@20")),
                     _fmt(r.get("seconds"), 2), _fmt(r.get("samples_per_second"), 0),
                     "*" if r.get("best") else ""])
    return md_table(header, rows)


def _summary_lines(run: Run) -> list[str]:
    m = run.metrics
    sps = [r.get("samples_per_second") for r in run.epochs if isinstance(r.get("samples_per_second"), (int, float))]
    items = [("dataset", m.get("dataset")), ("world size", m.get("world_size")),
             ("best epoch", f"{run.best_epoch} of {m.get('epochs_run', len(run.epochs))} run"),
             ("optimizer steps", m.get("steps")), ("seconds per epoch", _fmt(m.get("seconds_per_epoch"), 3)),
             ("seconds per step", _fmt(m.get("seconds_per_step"), 4)),
             ("samples per second (mean)", _fmt(sum(sps) / len(sps), 0) if sps else None),
             ("trainable parameters", m.get("num_parameters")), ("config digest", m.get("config_digest"))]
    return [f"- {k}: {v}" for k, v in items if v is not None]


def render_run_report(run: Run, plots: dict[str, str]) -> str:
    parts = [f"# Run report: {run.name}", "", f"Run directory `{run.path}`.", ""]
    parts += _summary_lines(run) + [""]
    if run.metrics.get("valid") or run.metrics.get("test"):
        parts += ["## Metrics at the best-validation epoch", "",
                  "Selected on validation " + str(run.config.get("valid_metric", "recall@20"))
                  + "; test metrics are those of that epoch (MMRec full-ranking protocol).", "",
                  metrics_table(run.metrics.get("valid", {}), run.metrics.get("test", {}), run.topk()), ""]
    if "loss" in plots:
        lc, lr = run.config.get("cl_weight", "λc"), run.config.get("reg_weight", "λr")
        parts += ["## Training loss per epoch", "",
                  f"Epoch means of the terms as computed, unweighted: loss = bpr + {_cfg(lc)}·hcl + {_cfg(lr)}·reg "
                  "(cl_weight, reg_weight).", "", f"![loss terms per epoch]({plots['loss']})", ""]
    if "valid" in plots:
        parts += ["## Validation per epoch", "", f"![validation Recall@20 and NDCG@20]({plots['valid']})", ""]
    if run.epochs:
        parts += ["## Per-epoch log", "", epochs_table(run), ""]
    if run.config:
        parts += ["## Configuration", "", md_table(["key", "value"], [[k, _cfg(v)] for k, v in run.config.items()]),
                  ""]
    parts += ["TensorBoard: `tensorboard --logdir " + str(run.path / "tb") + "`", ""]
    return "\n".join(parts)


def write_run_report(run_dir: str | Path, metrics: dict | None = None) -> Path:
    """Write RUNDIR/report.md and RUNDIR/plots/{loss,valid}.png; returns the report's path."""
    run = load_run(run_dir, metrics)
    plots = {}
    if run.epochs:
        plots["loss"] = plot_losses(run, run.path / "plots" / "loss.png").relative_to(run.path).as_posix()
        plots["valid"] = plot_validation(run, run.path / "plots" / "valid.png").relative_to(run.path).as_posix()
    out = run.path / "report.md"
    tmp = out.with_name(".report.md.tmp")
    tmp.write_text(render_run_report(run, plots))
    tmp.replace(out)
    return out


# ---------------------------------------------------------------------------------------- comparison

def _labels(runs: list[Run]) -> list[str]:
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def config_differences(runs: list[Run]) -> dict[str, list]:
    keys = []
    for r in runs:
        keys += [k for k in r.config if k not in keys]
    diff = {}
    for k in keys:
        vals = [r.config.get(k) for r in runs]
        if any(json.dumps(v, sort_keys=True) != json.dumps(vals[0], sort_keys=True) for v in vals):
            diff[k] = vals
    datasets = [r.metrics.get("dataset") for r in runs]
    if len(set(map(str, datasets))) > 1:
        diff["(dataset)"] = datasets
    return diff


def compare_runs(runs: list[Run], select_metric: str = "recall@20", ks=(10, 20, 50)) -> str:
    labels = _labels(runs)
    parts = [f"# Run comparison ({len(runs)} run{'s' if len(runs) != 1 else ''})", ""]
    parts += md_table(["", "run directory"], [[lab, f"`{r.path}`"] for lab, r in zip(labels, runs)]).splitlines()
    parts += ["", "## Configuration differences", ""]
    diff = config_differences(runs)
    if diff:
        parts.append(md_table(["key"] + labels, [[k] + [_cfg(v) for v in vals] for k, vals in diff.items()]))
    else:
        parts.append("All runs have the same configuration." if len(runs) > 1 else "(one run)")
    rows = []
    for key, digits in (("best_epoch", 0), ("epochs_run", 0), ("steps", 0), ("world_size", 0),
                        ("seconds_per_epoch", 3), ("seconds_per_step", 4)):
        rows.append([key] + [_fmt(r.metrics.get(key), digits) for r in runs])
    vals = [(r.metrics.get("valid") or {}).get(select_metric) for r in runs]
    finite = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    best_v = max(finite) if finite else None
    for split in ("valid", "test"):
        for name in ("recall", "ndcg"):
            for k in ks:
                key = f"{name}@{k}"
                row = [f"{split} {key}"]
                for r in runs:
                    v = (r.metrics.get(split) or {}).get(key)
                    cell = _fmt(v)
                    if split == "valid" and key == select_metric and v is not None and v == best_v and len(runs) > 1:
                        cell = f"**{cell}**"
                    row.append(cell)
                rows.append(row)
    parts += ["", "## Metrics (at each run's best-validation epoch)", "", md_table(["metric"] + labels, rows), ""]
    if len(runs) > 1 and best_v is not None:
        winner = labels[vals.index(best_v)]
        parts += [f"Best on validation {select_metric}: **{winner}** (compare test metrics only of runs chosen "
                  f"this way; picking the run with the best test metric overstates it).", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- CLI

def cmd_report(args) -> int:
    try:
        runs = [load_run(p) for p in args.runs]
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if len(runs) == 1 and not args.no_write:
        path = write_run_report(runs[0].path)
        print(f"wrote {path}", file=sys.stderr)
    text = compare_runs(runs, select_metric=args.metric)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if any(r.epochs for r in runs):
            png = plot_compare(runs, _labels(runs), out.with_name(out.stem + "_valid.png"), args.metric)
            text += f"\n## Validation {args.metric} per epoch\n\n![valid {args.metric}]({png.name})\n"
        out.write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    print(text)
    return 0


def register_cli(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("report", help="write RUNDIR/report.md, or compare several runs side by side",
                              description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="RUNDIR", help="run directories (lgmrec train --out)")
    p.add_argument("--out", metavar="FILE.md", help="also write the comparison (and a valid-metric plot) here")
    p.add_argument("--metric", default="recall@20", help="validation metric that marks the best run (recall@20)")
    p.add_argument("--no-write", action="store_true", help="with one RUNDIR: do not (re)write RUNDIR/report.md")
    p.set_defaults(func=cmd_report)
    return p


def main(argv=None) -> int:
    from lgmrec_dist.entry import run_subcommand
    return run_subcommand(register_cli, "report", argv)


if __name__ == "__main__":
    sys.exit(main())
