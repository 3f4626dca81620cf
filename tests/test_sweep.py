"""Sweeps: the grid, selection on VALIDATION only (a crafted table where validation and test
disagree), and a real 2x2 sweep of Ray Tune trials on the shared local Ray cluster."""
import json
from pathlib import Path

import pytest

from lgmrec_dist.sweep import SweepError, combinations, main as sweep_main, parse_grid, render_markdown, select_best, summarise


def test_parse_grid_and_combinations():
    grid = parse_grid(["learning_rate=0.001,1e-4", "use_mge=true,false", "cf_model=lightgcn"])
    assert grid == {"learning_rate": [0.001, 1e-4], "use_mge": [True, False], "cf_model": ["lightgcn"]}
    assert isinstance(grid["learning_rate"][1], float)  # YAML 1.1 reads "1e-4" as a string; we do not
    combos = combinations(grid)
    assert len(combos) == 4 and combos[0] == {"learning_rate": 0.001, "use_mge": True, "cf_model": "lightgcn"}
    assert combos[1]["use_mge"] is False and combos[2]["learning_rate"] == 1e-4  # grid order: last key fastest
    for bad in (["lr"], ["lr="], ["lr=1,1"], ["lr=1,"]):
        with pytest.raises(SweepError):
            parse_grid(bad)
    with pytest.raises(SweepError, match="twice"):
        parse_grid(["lr=1,2", "lr=3"])
    with pytest.raises(SweepError, match="at least one"):
        parse_grid([])


def trial(i, valid, test, status="ok"):
    return {"index": i, "name": f"t{i:03d}", "params": {"learning_rate": [0.001, 0.01][i // 2],
                                                         "embedding_size": [8, 16][i % 2]},
            "run_dir": f"/runs/t{i:03d}", "status": status, "best_epoch": 3,
            "valid": {"recall@20": valid, "ndcg@20": valid / 2}, "test": {"recall@20": test, "ndcg@20": test / 2}}


def test_selection_follows_validation_when_test_disagrees():
    # t001 is best on validation; t002 is best on test (what MMRec's grid search would pick);
    # t003 failed with a huge validation value that must not count
    trials = [trial(0, 0.30, 0.31), trial(1, 0.36, 0.29), trial(2, 0.33, 0.40), trial(3, 0.99, 0.99, "error")]
    assert select_best(trials) == 1
    summary = summarise(trials, {"learning_rate": [0.001, 0.01], "embedding_size": [8, 16]})
    assert summary["selected"]["name"] == "t001" and summary["selected"]["test"]["recall@20"] == 0.29
    assert summary["selection"]["split"] == "valid" and summary["test_based_pick_not_used"] == "t002"
    md = render_markdown(summary)
    assert "## Selected: t001" in md and "| t001 | 0.001 | 16 | ok | 3 | 0.3600 |" in md
    assert "would have chosen t002" in md
    # test values never matter: scramble them and the choice stays
    for t, noise in zip(trials, (0.9, 0.0, 0.5, 0.1)):
        t["test"] = {"recall@20": noise}
    assert select_best(trials) == 1
    # ties go to the first in grid order; NaN / missing validation values and failed trials never win
    assert select_best([trial(0, 0.2, 0.1), trial(1, 0.2, 0.9)]) == 0
    assert select_best([trial(0, float("nan"), 0.9), trial(1, 0.1, 0.0)]) == 1
    assert select_best([trial(0, 0.5, 0.5, "error")]) is None
    assert select_best([trial(0, 0.1, 0.1), trial(1, 0.2, 0.0)], metric="ndcg@20") == 1


def test_two_by_two_sweep_selects_on_validation(ray_cluster, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = sweep_main(["--config", "configs/demo.yaml", "--data", str(tiny_dataset), "--out", str(out),
                     "--grid", "learning_rate=0.001,0.01", "--grid", "embedding_size=8,16",
                     "--set", "epochs=2", "--set", "train_batch_size=512", "--set", "num_threads=1",
                     "--set", "checkpoint_every_epoch=false", "--max-concurrent", "2"])
    assert rc == 0
    summary = json.loads((out / "sweep.json").read_text())
    trials = summary["trials"]
    assert [t["status"] for t in trials] == ["ok"] * 4
    assert [t["params"] for t in trials] == [{"learning_rate": lr, "embedding_size": e}
                                             for lr in (0.001, 0.01) for e in (8, 16)]
    # the trial run directories are ordinary runs; the summary's numbers are theirs
    on_disk = [json.loads((Path(t["run_dir"]) / "metrics.json").read_text()) for t in trials]
    for t, m in zip(trials, on_disk):
        assert t["valid"] == m["valid"] and t["test"] == m["test"] and m["epochs_run"] == 2
        assert (Path(t["run_dir"]) / "report.md").is_file() and any((Path(t["run_dir"]) / "tb").iterdir())
    valid = [m["valid"]["recall@20"] for m in on_disk]
    chosen = valid.index(max(valid))
    assert summary["selected"]["index"] == chosen and summary["selected"]["test"] == on_disk[chosen]["test"]
    test = [m["test"]["recall@20"] for m in on_disk]
    if test.index(max(test)) != chosen:  # validation and test disagree on this data: the pick follows validation
        assert summary["test_based_pick_not_used"] == trials[test.index(max(test))]["name"]
    printed = capsys.readouterr().out
    assert f"## Selected: {trials[chosen]['name']}" in printed and (out / "sweep.md").read_text() in printed + "\n"
