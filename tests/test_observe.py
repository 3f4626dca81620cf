"""Run observability: TensorBoard event files read back with TensorBoard's own event reader,
RUNDIR/report.md with non-empty PNG plots, and `lgmrec report` comparing runs side by side."""
import json

import pytest
import yaml

from lgmrec_dist.config import load_config
from lgmrec_dist.observe import RunLog
from lgmrec_dist.report import compare_runs, load_run, main as report_main
from lgmrec_dist.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = {"embedding_size": 16, "train_batch_size": 256, "learning_rate": 0.005, "num_threads": 1, "epochs": 3,
        "checkpoint_every_epoch": False}


def scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 2000 and data.startswith(PNG_MAGIC), path


def fake_run(run_dir, epochs=4, best=2, lr=0.001, steps_per_epoch=5, extra_cfg=None):
    """Drive RunLog the way train() does, with made-up values; returns the per-step terms written."""
    run_dir.mkdir(parents=True)
    cfg = {**load_config(None).to_dict(), "learning_rate": lr, **(extra_cfg or {})}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    rl, step, written = RunLog(run_dir), 0, []
    for e in range(epochs):
        for _ in range(steps_per_epoch):
            terms = {"loss": 1.0 / (step + 1), "bpr": 0.9 / (step + 1), "hcl": 0.01 * step, "reg": 1e-6 * step}
            rl.step(step, terms)
            written.append(terms)
            step += 1
        valid = {"recall@20": 0.1 + 0.1 * e - (0.15 if e > best else 0), "ndcg@20": 0.05 + 0.02 * e}
        rl.epoch({"epoch": e, "step": step, "train": {"loss": 1 / (e + 1), "bpr": 0.9 / (e + 1), "hcl": 0.01, "reg": 1e-6},
                  "learning_rate": lr, "seconds": 0.5, "seconds_per_step": 0.1, "samples_per_second": 1000.0 + e,
                  "valid": valid, "best": e <= best, "test": None})
    metrics = {"best_epoch": best, "epochs_run": epochs, "steps": step, "world_size": 1,
               "valid": {"recall@20": 0.3, "ndcg@20": 0.09}, "test": {"recall@20": 0.28, "ndcg@20": 0.08},
               "seconds_per_epoch": 0.5, "seconds_per_step": 0.1, "dataset": "/data/x"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    rl.finish(metrics)
    return written


def test_runlog_writes_tensorboard_scalars_and_report(tmp_path):
    run = tmp_path / "run"
    written = fake_run(run)
    got = scalars(run / "tb")
    for term in ("loss", "bpr", "hcl", "reg"):  # every optimizer step, terms separately
        assert [s for s, _ in got[f"loss_step/{term}"]] == list(range(20))
        assert [v for _, v in got[f"loss_step/{term}"]] == pytest.approx([t[term] for t in written], rel=1e-6)
        assert len(got[f"loss_epoch/{term}"]) == 4
    assert [s for s, _ in got["valid/recall@20"]] == [0, 1, 2, 3]
    assert got["valid/ndcg@20"][3][1] == pytest.approx(0.11)
    assert got["optim/learning_rate"][0][1] == pytest.approx(0.001)
    assert got["perf/samples_per_second"][-1][1] == pytest.approx(1003.0)
    assert "perf/seconds_per_step" in got and "perf/epoch_seconds" in got
    assert got["best/valid_recall@20"] == [(2, pytest.approx(0.3))]
    assert len((run / "epochs.jsonl").read_text().splitlines()) == 4
    report = (run / "report.md").read_text()
    assert "![loss terms per epoch](plots/loss.png)" in report and "(plots/valid.png)" in report
    assert "best epoch: 2 of 4 run" in report and "| recall | " in report
    assert_png(run / "plots" / "loss.png")
    assert_png(run / "plots" / "valid.png")


def test_runlog_step_is_buffered_and_rank_nonzero_is_noop(tmp_path):
    """A step only appends to a buffer (what keeps it at ~1 µs: bench/bench_runlog.py); the events are
    written at the flush, every one of them."""
    rl = RunLog(tmp_path, report=False, flush_every=10**9)
    terms = {"loss": 0.5, "bpr": 0.4, "hcl": 0.1, "reg": 0.0}
    for s in range(5000):
        rl.step(s, terms)
    assert not list(tmp_path.glob("tb/events.out.tfevents.*"))     # no writer, no file touched per step
    rl.finish({})
    assert len(scalars(tmp_path / "tb")["loss_step/bpr"]) == 5000
    quiet = RunLog(None)  # ranks other than 0
    quiet.step(0, terms)
    quiet.epoch({"epoch": 0})
    quiet.finish({})


def test_resumed_run_log_shows_repeated_steps_once(tmp_path):
    first = RunLog(tmp_path, report=False)
    for s in range(10):
        first.step(s, {"loss": 1.0, "bpr": 1.0, "hcl": 0.0, "reg": 0.0})
    first.epoch({"epoch": 0, "step": 10, "train": {"loss": 1.0}, "valid": {"recall@20": 0.1}})
    first._writer.flush()  # the process dies here: no finish()
    second = RunLog(tmp_path, report=False)  # resumed from a checkpoint at step 6
    for s in range(6, 12):
        second.step(s, {"loss": 2.0, "bpr": 2.0, "hcl": 0.0, "reg": 0.0})
    second.epoch({"epoch": 1, "step": 12, "train": {"loss": 2.0}, "valid": {"recall@20": 0.2}})
    second.finish({"steps": 12})
    got = scalars(tmp_path / "tb")["loss_step/loss"]
    assert got == [(s, 1.0) for s in range(6)] + [(s, 2.0) for s in range(6, 12)]
    assert [json.loads(x)["epoch"] for x in (tmp_path / "epochs.jsonl").read_text().splitlines()] == [0, 1]


def test_training_run_writes_tensorboard_and_report(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    m = train(tiny_dataset, load_config("configs/demo.yaml", FAST), run)
    got = scalars(run / "tb")
    assert len(got["loss_step/hcl"]) == m["steps"] and len(got["loss_step/bpr"]) == m["steps"]
    assert len(got["valid/recall@20"]) == m["epochs_run"] == len(got["loss_epoch/reg"])
    assert got["loss_step/reg"][0][1] > 0 and got["perf/samples_per_second"][0][1] > 0
    rows = [json.loads(x) for x in (run / "epochs.jsonl").read_text().splitlines()]
    assert [r["valid"]["recall@20"] for r in rows] == pytest.approx([v for _, v in got["valid/recall@20"]], rel=1e-6)
    report = (run / "report.md").read_text()
    assert f"{m['test']['recall@20']:.4f}" in report and f"best epoch: {m['best_epoch']} of" in report
    assert_png(run / "plots" / "loss.png")
    assert_png(run / "plots" / "valid.png")


def test_report_compares_runs_side_by_side(tmp_path, capsys):
    fake_run(tmp_path / "a", lr=0.001)
    fake_run(tmp_path / "b", lr=0.01, best=1, extra_cfg={"cl_weight": 0.01})
    (tmp_path / "b" / "metrics.json").write_text(json.dumps(
        {**json.loads((tmp_path / "b" / "metrics.json").read_text()), "valid": {"recall@20": 0.4}}))
    out = tmp_path / "cmp" / "compare.md"
    assert report_main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Run comparison (2 runs)") and "## Metrics" in capsys.readouterr().out
    diff = text.split("## Configuration differences")[1].split("## Metrics")[0]
    assert "| learning_rate | 0.001 | 0.01 |" in diff and "| cl_weight | 0.0001 | 0.01 |" in diff and "embedding_size" not in diff
    assert "| valid recall@20 | 0.3000 | **0.4000** |" in text and "| test recall@20 | 0.2800 | 0.2800 |" in text
    assert "Best on validation recall@20: **b**" in text
    assert_png(out.with_name("compare_valid.png"))
    # one run: (re)writes its report.md
    (tmp_path / "a" / "report.md").unlink()
    assert report_main([str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "report.md").is_file()
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "(one run)" in compare_runs([load_run(tmp_path / "a")])
