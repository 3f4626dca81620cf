"""Run observability, written by rank 0 only (``RunLog(None)`` is a no-op for the other ranks).

- ``RUNDIR/epochs.jsonl``: one JSON object per epoch (a platform can scrape it);
- ``RUNDIR/tb/``: TensorBoard event files (``tensorboard --logdir RUNDIR/tb``) with the scalars

      loss_step/{loss,bpr,hcl,reg}      every optimizer step (x = global step)
      loss_epoch/{loss,bpr,hcl,reg}     epoch means (x = epoch)
      valid/<metric>@K                  validation metrics (x = epoch)
      optim/learning_rate               (x = epoch)
      perf/seconds_per_step, perf/samples_per_second, perf/epoch_seconds   (x = epoch)
      best/valid_<metric>, best/epoch   at the end of the run

- ``RUNDIR/report.md`` with PNG plots under ``RUNDIR/plots/`` at ``finish`` (lgmrec_dist.report).

``step`` is called every optimizer step, so it only appends a tuple to a buffer; the buffer becomes
TensorBoard events in ``epoch`` (after the epoch's timer stopped) or every ``flush_every`` steps.
Each step becomes one event holding its four terms (one protobuf, ~70 us per step on the 2-core
development machine, paid at the flush, outside the epoch's timer), with the wall time recorded when
the step was logged. A resumed run appends to epochs.jsonl (train() has cut it back to the checkpoint)
and opens its TensorBoard writer with ``purge_step`` = its first step, so the steps it repeats are
shown once. TensorBoard is optional at run time: without the package the
event files are skipped with one warning and everything else is written.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

log = logging.getLogger("lgmrec")

STEP_TERMS = ("loss", "bpr", "hcl", "reg")


def _tensorboard():
    try:
        from torch.utils.tensorboard import SummaryWriter
        from tensorboard.compat.proto.summary_pb2 import Summary
    except ImportError as exc:  # tensorboard is a dependency, but a stripped image may lack it
        log.warning("TensorBoard event files not written (%s); pip install tensorboard", exc)
        return None, None
    return SummaryWriter, Summary


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class RunLog:
    def __init__(self, run_dir: Path | None, tensorboard: bool = True, report: bool = True,
                 flush_every: int = 1000):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self._epochs = None
        self._writer = self._writer_cls = self._summary = None
        self._steps: list = []
        self._flush_every = flush_every
        self._report = report
        if self.run_dir is None:
            return
        # appended: train() has already cut the log to the epochs before a resumed checkpoint (empty when fresh)
        self._epochs = open(self.run_dir / "epochs.jsonl", "a")
        if tensorboard:
            self._writer_cls, self._summary = _tensorboard()

    def _ensure_writer(self, first_step: int):
        """The SummaryWriter, created at the first flush: a resumed run (tb/ already holds event files)
        passes ``purge_step`` = its first step, so TensorBoard hides the old file's events from that step on
        (they are logged again) instead of drawing both."""
        if self._writer is None and self._writer_cls is not None:
            tb = self.run_dir / "tb"
            resumed = tb.is_dir() and any(tb.glob("events.out.tfevents.*"))
            self._writer = self._writer_cls(str(tb), flush_secs=30, purge_step=first_step if resumed else None)
        return self._writer

    # -- per optimizer step: keep it cheap ------------------------------------------------------
    def step(self, step: int, terms: dict) -> None:
        """Loss terms of one optimizer step (global values)."""
        if self._writer_cls is None:
            return
        self._steps.append((step, time.time(), terms))
        if len(self._steps) >= self._flush_every:
            self._flush_steps()

    def _flush_steps(self) -> None:
        if not self._steps:
            return
        fw, Summary = self._ensure_writer(self._steps[0][0])._get_file_writer(), self._summary
        for step, wall, terms in self._steps:
            values = [Summary.Value(tag=f"loss_step/{k}", simple_value=float(terms[k]))
                      for k in STEP_TERMS if k in terms]
            fw.add_summary(Summary(value=values), step, wall)
        self._steps.clear()

    # -- per epoch ------------------------------------------------------------------------------
    def epoch(self, record: dict) -> None:
        if self._epochs is not None:
            self._epochs.write(json.dumps(record, allow_nan=False) + "\n")  # strict JSON for scrapers
            self._epochs.flush()
        if self._writer_cls is None:
            return
        self._flush_steps()
        w, e = self._ensure_writer(int(record.get("step") or 0)), record.get("epoch", 0)
        for k, v in (record.get("train") or {}).items():
            if _finite(v):
                w.add_scalar(f"loss_epoch/{k}", v, e)
        for k, v in (record.get("valid") or {}).items():
            if _finite(v):
                w.add_scalar(f"valid/{k}", v, e)
        scalars = {"optim/learning_rate": record.get("learning_rate"),
                   "perf/seconds_per_step": record.get("seconds_per_step"),
                   "perf/samples_per_second": record.get("samples_per_second"),
                   "perf/epoch_seconds": record.get("seconds")}
        for tag, v in scalars.items():
            if _finite(v):
                w.add_scalar(tag, v, e)
        w.flush()

    # -- end of run -----------------------------------------------------------------------------
    def finish(self, metrics: dict) -> None:
        if self._epochs is not None:
            self._epochs.close()
            self._epochs = None
        if self._writer_cls is not None:
            self._flush_steps()
            self._ensure_writer(int(metrics.get("steps") or 0))
            best = metrics.get("best_epoch")
            if _finite(best):
                self._writer.add_scalar("best/epoch", best, 0)
                for k, v in (metrics.get("valid") or {}).items():
                    if _finite(v):
                        self._writer.add_scalar(f"best/valid_{k}", v, best)
            self._writer.close()
            self._writer = self._writer_cls = None
        if self.run_dir is not None and self._report:
            try:
                from lgmrec_dist.report import write_run_report
                path = write_run_report(self.run_dir, metrics)
                log.info("report: %s", path)
            except Exception as exc:  # a report must never fail a finished training run
                log.warning("report.md not written: %s: %s", type(exc).__name__, exc)
