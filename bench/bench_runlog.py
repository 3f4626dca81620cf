"""Cost of ``RunLog.step`` (the per-step TensorBoard loss record, lgmrec_dist/observe.py) in the training loop.

A step appends to a buffer; the events are written at each flush (every ``flush_every`` steps and at each
epoch). Prints microseconds per step with the buffer only, and with the flushes included.

    .venv/bin/python bench/bench_runlog.py
"""
import tempfile
import time
from pathlib import Path

from lgmrec_dist.observe import RunLog

TERMS = {"loss": 0.5, "bpr": 0.4, "hcl": 0.1, "reg": 0.0}


def per_step(flush_every: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as d:
        log = RunLog(Path(d), report=False, flush_every=flush_every)
        t0 = time.perf_counter()
        for s in range(steps):
            log.step(s, TERMS)
        if flush_every < steps:
            log._flush_steps()  # the last partial buffer, as an epoch's end writes it
        out = (time.perf_counter() - t0) / steps
        log.finish({})
    return out


if __name__ == "__main__":
    steps = 20_000
    print(f"RunLog.step, buffer only:           {per_step(10**9, steps) * 1e6:7.2f} us/step")
    print(f"RunLog.step, flushed every 1000:    {per_step(1000, steps) * 1e6:7.2f} us/step")
