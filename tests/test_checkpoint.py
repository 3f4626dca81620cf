"""Checkpoints: exact resume after a SIGKILL, in one process and under torchrun with restarts;
refusal of truncated and mismatched checkpoints; the run-directory lock."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgmrec_dist.checkpoint import CheckpointError, RunLock
from lgmrec_dist.config import load_config
from lgmrec_dist.train import train

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["epochs=3", "embedding_size=8", "train_batch_size=256", "checkpoint_every_steps=4",
            "deterministic=true", "num_threads=1", "learning_rate=0.01"]
KILL_AT = 14  # mid-epoch 1 (10 steps per epoch); the last checkpoint before it is at step 12


def lgmrec_train(data, out, *extra, nproc=0, env=None, settings=SETTINGS):
    sets = [x for kv in settings for x in ("--set", kv)]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "--max-restarts=1", "-m", "lgmrec_dist.train"]
    else:
        cmd = [sys.executable, "-m", "lgmrec_dist", "train"]
    cmd += ["--data", str(data), "--config", "configs/demo.yaml", "--out", str(out), *sets, *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def final_state(run: Path) -> dict:
    latest = sorted((run / "checkpoints").glob("step-*"))[-1]
    return {r.name: torch.load(r, weights_only=True)["engine"]["model"] for r in sorted(latest.glob("rank-*.pt"))}


def assert_same_run(a: Path, b: Path):
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    for key in ("best_epoch", "epochs_run", "steps", "train_loss", "valid", "test"):
        assert ma[key] == mb[key], key
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    for rank in sa:
        for name, value in sa[rank].items():
            assert torch.equal(value, sb[rank][name]), (rank, name)


def test_killed_and_resumed_run_equals_uninterrupted(tiny_dataset, tmp_path):
    full = lgmrec_train(tiny_dataset, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = lgmrec_train(tiny_dataset, tmp_path / "resumed", env={"LGMREC_KILL_AT_STEP": str(KILL_AT)})
    assert killed.returncode == -9 and not (tmp_path / "resumed" / "metrics.json").exists()
    assert (tmp_path / "resumed" / "checkpoints" / "step-0000000012-0" / "meta.json").exists()
    again = lgmrec_train(tiny_dataset, tmp_path / "resumed")        # automatic resume
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    assert_same_run(tmp_path / "full", tmp_path / "resumed")
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "resumed" / "epochs.jsonl").read_text().splitlines()]
    assert epochs == [0, 1, 2]


def test_resumed_after_the_best_epoch_reports_its_test_metrics(tiny_dataset, tmp_path):
    """The test set is ranked once, after the loop; a run killed after its best epoch has lost that epoch's
    embeddings, takes the best model back from RUNDIR/best and reports the uninterrupted run's numbers."""
    settings = [*SETTINGS, "epochs=8", "learning_rate=0.05"]
    full = lgmrec_train(tiny_dataset, tmp_path / "full", settings=settings)
    assert full.returncode == 0, full.stderr[-3000:]
    best = json.loads((tmp_path / "full" / "metrics.json").read_text())["best_epoch"]
    assert best < 7  # a later epoch to resume in (none after the best improves on it)
    kill = 10 * (best + 1) + 3  # mid-epoch best + 1
    killed = lgmrec_train(tiny_dataset, tmp_path / "resumed", env={"LGMREC_KILL_AT_STEP": str(kill)},
                          settings=settings)
    assert killed.returncode == -9
    again = lgmrec_train(tiny_dataset, tmp_path / "resumed", settings=settings)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the best model of this run taken back" in again.stderr
    assert_same_run(tmp_path / "full", tmp_path / "resumed")


def test_torchrun_restarts_a_killed_rank_and_matches(tiny_dataset, tmp_path):
    full = lgmrec_train(tiny_dataset, tmp_path / "full", nproc=2)
    assert full.returncode == 0, full.stderr[-3000:]
    res = lgmrec_train(tiny_dataset, tmp_path / "restarted", nproc=2,
                       env={"LGMREC_KILL_AT_STEP": str(KILL_AT), "LGMREC_KILL_RANK": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr  # the group was restarted and continued from the checkpoint
    assert_same_run(tmp_path / "full", tmp_path / "restarted")


@pytest.fixture
def checkpointed_run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    res = lgmrec_train(tiny_dataset, run, env={"LGMREC_KILL_AT_STEP": "6"})
    assert res.returncode == -9
    return run


def test_truncated_checkpoint_is_refused(tiny_dataset, checkpointed_run):
    path = sorted((checkpointed_run / "checkpoints").glob("step-*"))[-1] / "rank-0.pt"
    path.write_bytes(path.read_bytes()[:100])
    res = lgmrec_train(tiny_dataset, checkpointed_run)
    assert res.returncode == 2 and "truncated or corrupt" in res.stderr and "rank-0.pt" in res.stderr


def test_checkpoint_from_another_config_or_dataset_is_refused(tiny_dataset, signal_dataset, checkpointed_run):
    res = lgmrec_train(tiny_dataset, checkpointed_run, settings=SETTINGS + ["alpha=0.9"])
    assert res.returncode == 2 and "different configuration" in res.stderr
    res = lgmrec_train(signal_dataset, checkpointed_run)
    assert res.returncode == 2 and "different dataset" in res.stderr
    res = lgmrec_train(tiny_dataset, checkpointed_run, settings=SETTINGS + ["epochs=4"])  # may change
    assert res.returncode == 0, res.stderr[-3000:]


def test_second_run_on_the_same_directory_is_refused(tiny_dataset, tmp_path):
    lock = RunLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(CheckpointError, match="in use by another training run"):
            train(tiny_dataset, load_config("configs/demo.yaml", {"epochs": 1}), tmp_path / "run")
        res = lgmrec_train(tiny_dataset, tmp_path / "run")
        assert res.returncode == 2 and "in use by another training run" in res.stderr
    finally:
        lock.release()
    assert train(tiny_dataset, load_config("configs/demo.yaml", {"epochs": 1, "embedding_size": 8}),
                 tmp_path / "run")["epochs_run"] == 1
