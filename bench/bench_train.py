"""Benchmark: seconds per step and per epoch, and peak RSS, of single-process LGMRec training on synthetic
catalogues, side by side with the direct form, and where the step's time goes.

    .venv/bin/python bench/bench_train.py                 # Baby-sized (1x) and 10x, official features
    .venv/bin/python bench/bench_train.py --scales 1 --max-steps 20

Scale 1 = an MMRec-Baby-sized catalogue (19,445 users, 7,050 items, 160,792 interactions, image 4096-d
and text 384-d features); scale s multiplies users, items and interactions by s. Each scale runs in its
own process (peak RSS is per process). In the same process, on the same batches, one after the other:
our step (the fused low-rank log-sum-exp, ``model/lowrank_lse.py``; ``deterministic`` as configured), our
step with the log-sum-exp forced to its direct form (``LGMREC_LSE=direct``), our step with the other
``deterministic`` setting, and the direct spec form (``lgmrec_dist.model.reference``: one
full-graph forward per batch, as the official code does), so the speed-ups are ratios measured on the same
machine at the same moment. ``torch.profiler`` over a few of our steps then gives the fraction of the step
spent in the contrastive denominators (the log-sum-exp, forward and backward) and the ops that take the
rest. The load average before and after is printed: the figures are only as quiet as the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BABY = dict(num_users=19_445, num_items=7_050, num_interactions=160_792)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


LSE_EVENTS = ("_Fused", "_FusedBackward", "_Direct", "_DirectBackward", "_Compiled", "_CompiledBackward")


def timed_steps(model, opt, batch, steps: int, loss_fn=None, first: int = 0) -> float:
    """Seconds per optimiser step over batches first, ..., first + steps - 1."""
    t0 = time.perf_counter()
    for b in range(first, first + steps):
        loss = (loss_fn(model, *batch(b), step=b) if loss_fn else model.batch_loss(*batch(b), step=b))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def step_profile(model, opt, batch, steps: int, first: int, top: int = 8) -> dict:
    """Fraction of the step in the contrastive denominators, and the ops (self time) that take the rest."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        timed_steps(model, opt, batch, steps, first=first)
        total = time.perf_counter() - t0
    self_s = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    lse = sum(self_s.pop(k, 0.0) for k in LSE_EVENTS)
    rest = sorted(self_s.items(), key=lambda kv: -kv[1])[:top]
    return {"profiled_seconds_per_step": round(total / steps, 4), "lse_fraction": round(lse / total, 3),
            "lse_ms_per_step": round(1e3 * lse / steps, 1),
            "rest_ms_per_step": {k: round(1e3 * v / steps, 1) for k, v in rest}}


def dataset_for(scale: int, out_root: Path) -> Path:
    from data_prep.synthetic import make_prepared_synthetic
    path = out_root / f"synthetic_x{scale}"
    if not (path / "manifest.json").exists():
        make_prepared_synthetic(path, num_users=BABY["num_users"] * scale, num_items=BABY["num_items"] * scale,
                                num_interactions=BABY["num_interactions"] * scale,
                                modalities={"image": 4096, "text": 384}, seed=scale, overwrite=True)
    return path


def run_one(scale: int, max_steps: int, reference_steps: int, out_root: Path, profile_steps: bool = True) -> dict:
    from lgmrec_dist.batches import TripleSampler
    from lgmrec_dist.config import load_config
    from lgmrec_dist.dataset import TRAIN, PreparedDataset, features_tensor
    from lgmrec_dist.graph import build_graph
    from lgmrec_dist.model import LGMRec, model_params
    from lgmrec_dist.model.lowrank_lse import form_for, use_form
    from lgmrec_dist.model.reference import reference_loss
    from lgmrec_dist.train import make_evaluators, set_determinism

    path = dataset_for(scale, out_root)
    ds = PreparedDataset.load(path)
    cfg = load_config(ROOT / "configs" / "baby.yaml")
    torch.manual_seed(cfg.seed)
    tu, ti = ds.pairs(TRAIN)
    t0 = time.perf_counter()
    graph = build_graph(ds.num_users, ds.num_items, tu, ti)
    model = LGMRec(model_params(cfg), ds.num_users, ds.num_items, ds.manifest["modalities"])
    model.attach(graph, {m: features_tensor(x) for m, x in ds.features.items()})
    setup_s = time.perf_counter() - t0
    sampler = TripleSampler(ds.num_items, tu, ti, cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    users, pos, neg = (torch.from_numpy(a) for a in sampler.epoch(0))
    n_batches = sampler.num_batches(cfg.train_batch_size)
    steps = min(n_batches, max_steps) if max_steps else n_batches

    def batch(b):
        sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
        return users[sl], pos[sl], neg[sl]

    set_determinism(cfg.deterministic)  # as a training run sets it (default: true)
    probe = torch.zeros(1, cfg.hyper_num)
    lse_form = form_for(probe, probe)  # compiles the kernel here (once per machine) if it is not cached yet
    load_before = os.getloadavg()
    fast_step = timed_steps(model, opt, batch, steps)
    fast_rss = peak_rss_gb()

    t0 = time.perf_counter()
    model.eval()
    valid_eval, _ = make_evaluators(ds, cfg)
    metrics = valid_eval.evaluate_metrics(*model.final_embeddings())
    eval_s = time.perf_counter() - t0
    model.train()

    # the forms interleaved step by step on the same batches: a change of machine load hits all of them
    paired = {"fused": 0.0, "direct_lse": 0.0, "reference": 0.0, "other_setting": 0.0}
    for b in range(reference_steps):
        paired["fused"] += timed_steps(model, opt, batch, 1, first=b) / reference_steps
        with use_form("direct"):
            paired["direct_lse"] += timed_steps(model, opt, batch, 1, first=b) / reference_steps
        set_determinism(False)  # the official code runs with torch's defaults
        paired["reference"] += timed_steps(model, opt, batch, 1, loss_fn=reference_loss, first=b) / reference_steps
        set_determinism(not cfg.deterministic)
        paired["other_setting"] += timed_steps(model, opt, batch, 1, first=b) / reference_steps
        set_determinism(cfg.deterministic)
    fused_step, direct_lse_step, ref_step, other_mode_step = (paired[k] if reference_steps else None for k in paired)
    prof = step_profile(model, opt, batch, min(5, n_batches), first=0) if profile_steps else {}
    load_after = os.getloadavg()
    return {
        "scale": scale, "users": ds.num_users, "items": ds.num_items, "interactions": ds.manifest["num_interactions"],
        "threads": torch.get_num_threads(), "setup_s": round(setup_s, 2), "steps_timed": steps,
        "steps_per_epoch": n_batches, "seconds_per_step": round(fast_step, 4),
        "seconds_per_epoch": round(fast_step * n_batches, 2), "epoch_measured": steps == n_batches,
        "eval_valid_s": round(eval_s, 2), "valid_recall@20": metrics["recall@20"],
        "peak_rss_gb_train": round(fast_rss, 2), "lse_form": lse_form,
        "paired_seconds_per_step": fused_step and round(fused_step, 4),
        "direct_lse_seconds_per_step": direct_lse_step and round(direct_lse_step, 4),
        "speedup_vs_direct_lse": direct_lse_step and round(direct_lse_step / fused_step, 2),
        "reference_seconds_per_step": ref_step and round(ref_step, 4), "deterministic": cfg.deterministic,
        "other_deterministic_setting_seconds_per_step": other_mode_step and round(other_mode_step, 4),
        "speedup_vs_reference": ref_step and round(ref_step / fused_step, 2), "peak_rss_gb": round(peak_rss_gb(), 2),
        **prof, "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    p.add_argument("--max-steps", type=int, default=0, help="time only this many steps (0 = a whole epoch)")
    p.add_argument("--reference-steps", type=int, default=3,
                   help="steps timed, interleaved, for our step, with the direct log-sum-exp, with the other "
                        "deterministic setting, and the direct form")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler breakdown")
    p.add_argument("--out", default=str(ROOT / "bench" / "out"))
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.max_steps, args.reference_steps, out_root, not args.no_profile)))
        return
    rows = []
    for scale in args.scales:
        cmd = [sys.executable, __file__, "--one", str(scale), "--max-steps", str(args.max_steps),
               "--reference-steps", str(args.reference_steps), "--out", str(out_root)] + (
                   ["--no-profile"] if args.no_profile else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"scale {scale} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["scale", "users", "items", "interactions", "seconds_per_step", "seconds_per_epoch", "epoch_measured",
            "eval_valid_s", "peak_rss_gb", "paired_seconds_per_step", "direct_lse_seconds_per_step",
            "reference_seconds_per_step", "speedup_vs_reference", "other_deterministic_setting_seconds_per_step",
            "lse_fraction", "load_average_before"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c)) for c in cols) + " |")
    for r in rows:
        if "rest_ms_per_step" in r:
            print(f"\nscale {r['scale']}: {r['profiled_seconds_per_step']} s/step profiled, of which the contrastive "
                  f"denominators {r['lse_ms_per_step']} ms ({100 * r['lse_fraction']:.0f}%); the rest, ms/step by op:")
            for op, ms in r["rest_ms_per_step"].items():
                print(f"  {op:40s} {ms:8.1f}")


if __name__ == "__main__":
    main()
