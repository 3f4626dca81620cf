"""Run observability: structured per-epoch logs (RUNDIR/epochs.jsonl, one JSON object per epoch).

Only rank 0 writes (``RunLog(None)`` is a no-op for the other ranks).
"""
from __future__ import annotations

import json
from pathlib import Path


class RunLog:
    def __init__(self, run_dir: Path | None):
        self.run_dir = run_dir
        self._epochs = None
        if run_dir is not None:
            self._epochs = open(Path(run_dir) / "epochs.jsonl", "a")  # appended: a resumed run keeps earlier epochs

    def step(self, step: int, terms: dict) -> None:
        """Loss terms of one optimizer step (global values)."""

    def epoch(self, record: dict) -> None:
        if self._epochs is not None:
            self._epochs.write(json.dumps(record) + "\n")
            self._epochs.flush()

    def finish(self, metrics: dict) -> None:
        if self._epochs is not None:
            self._epochs.close()
            self._epochs = None
