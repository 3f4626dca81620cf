"""Benchmark and check: the forms of the low-rank log-sum-exp (``lgmrec_dist/model/lowrank_lse.py``) at the
Baby step's sizes, against the direct form, on one device.

    .venv/bin/python bench/bench_lse.py                            # CPU: fused kernel vs direct form
    .venv/bin/python bench/bench_lse.py --device cuda              # CUDA: torch.compile form vs direct form
    .venv/bin/python bench/bench_lse.py --forms fused compiled direct

For each size (anchors × keys × A: the user and the item denominators of a Baby batch) it prints the
largest deviation of the value and of both gradients from the direct form (relative to their largest
entry) and the milliseconds of one forward + backward, timed in the same process. Exits 1 if a deviation
exceeds 1e-4 or if a form fell back to another (e.g. no Triton for the compiled form).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = [(1900, 19_445, 4), (1400, 7_050, 4)]


def inputs(b, n, a, device):
    """Normalised anchors times M^T / tau against softmax rows scaled by 1/||h M||, as in infonce_lowrank."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(a, 64, generator=gen)
    anchor = torch.nn.functional.normalize(torch.randn(b, 64, generator=gen), dim=1)
    h = torch.softmax(torch.randn(n, a, generator=gen) / 0.2, dim=1)
    q, k = (anchor @ m.t()) / 0.2, h / (h @ m).norm(dim=1, keepdim=True)
    return q.to(device), k.to(device), (torch.rand(b, generator=gen) + 0.5).to(device)


def run(form, q, k, grad, repeats):
    """(value, grad q, grad k), best ms of ``repeats`` forward + backward, and the form that actually ran."""
    from lgmrec_dist.model.lowrank_lse import _unavailable, form_for, lowrank_logsumexp, use_form
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    with use_form(form):
        times = []
        for _ in range(repeats + 1):  # the first call compiles / warms up: not timed
            q.grad = k.grad = None
            sync()
            t0 = time.perf_counter()
            lse = lowrank_logsumexp(q, k)
            lse.backward(grad)
            sync()
            times.append(time.perf_counter() - t0)
        ran = "direct (fallback)" if _unavailable & {form, f"{form}-backward"} else form_for(q, k)
    return (lse.detach(), q.grad, k.grad), 1e3 * min(times[1:]), ran


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--forms", nargs="+", help="default: fused (CPU) or compiled (CUDA), and direct")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    forms = args.forms or ["compiled" if device.type == "cuda" else "fused", "direct"]
    if "direct" not in forms:
        forms.append("direct")
    ok = True
    for b, n, a in SIZES:
        q, k, grad = inputs(b, n, a, device)
        results = {f: run(f, q, k, grad, args.repeats) for f in forms}
        want, direct_ms, _ = results["direct"]
        for form, (got, ms, ran) in results.items():
            dev = [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
            ok &= max(dev) <= 1e-4 and ran == form
            print(json.dumps({"device": str(device), "form": form, "ran": ran, "anchors": b, "keys": n, "A": a,
                              "ms_forward_backward": round(ms, 2), "speedup_vs_direct": round(direct_ms / ms, 2),
                              "max_rel_dev_lse_gq_gk": [float(f"{d:.2e}") for d in dev],
                              "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}))
    print("equal to the direct form" if ok else "DEVIATION above 1e-4 or a form fell back")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
