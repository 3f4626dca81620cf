"""Failure behaviour (docs/failures.md): a refused command writes nothing, every expected failure ends in
one ``error:`` line without a traceback, a diverging loss stops the run, a full disk keeps the last good
state. Real files, real training, real Ray (the session's cluster) and a real tmpfs for the full disk."""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_prep.synthetic import make_mmrec_synthetic, make_prepared_synthetic
from lgmrec_dist.checkpoint import read_sharded
from lgmrec_dist.cli import main
from lgmrec_dist.entry import guarded
from lgmrec_dist.config import ConfigError, load_config
from lgmrec_dist.dataset import PreparedDataset, atomic_write_json
from lgmrec_dist.train import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"epochs": 1, "embedding_size": 8, "train_batch_size": 512}


def cli(argv, capsys) -> tuple[int, str]:
    """``lgmrec ARGV`` in this process: (exit status, stderr); an exception escaping main fails the test."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    err = capsys.readouterr().err
    return rc, err


def refused(argv, capsys, *needles) -> str:
    rc, err = cli(argv, capsys)
    assert rc != 0 and "Traceback" not in err, err
    line = [x for x in err.splitlines() if "error:" in x]
    assert line, err
    for needle in needles:
        assert needle in line[-1], line[-1]
    return line[-1]


def snapshot(path: Path) -> dict:
    """Every file's bytes and every directory under ``path`` (None if ``path`` is absent)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else "dir") for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_prepared_synthetic(tmp_path_factory.mktemp("fail") / "d", num_users=60, num_items=40,
                                   num_interactions=600, modalities={"image": 4, "text": 3}, seed=3)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A finished one-epoch run (best model, one checkpoint, metrics.json)."""
    out = tmp_path_factory.mktemp("fail") / "run"
    train(data, load_config("configs/demo.yaml", SMALL), out)
    return out


@pytest.fixture
def interrupted(run, tmp_path):
    """A copy of ``run`` without metrics.json: a run that would resume from its checkpoint."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "metrics.json").unlink()
    return out


@pytest.fixture
def features(tmp_path):
    """Parquet modality files for cold items: image 4-d, text 3-d (as the run's dataset)."""
    paths = {}
    for name, dim in (("image", 4), ("text", 3)):
        paths[name] = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"item_id": ["n1", "n2"], "embedding": [[1.0] * dim, [0.5] * dim]}), paths[name])
    return paths


# --------------------------------------------------------------------------------------------------
# 1. a refused resume leaves the run as it was
# --------------------------------------------------------------------------------------------------

def test_refused_resume_leaves_the_run_byte_for_byte(interrupted, data, capsys):
    before = snapshot(interrupted)
    refused(["train", "--data", data, "--out", interrupted, "--config", "configs/demo.yaml",
             "--set", "epochs=1", "--set", "embedding_size=16", "--set", "train_batch_size=512"],
            capsys, "different configuration")
    assert snapshot(interrupted) == before       # config.yaml still describes the checkpoint's model
    assert load_config(interrupted / "config.yaml").embedding_size == 8


# --------------------------------------------------------------------------------------------------
# 2. bad numbers: refused at load; a loss that turns NaN/inf stops the run
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("alpha", ".nan"), ("alpha", ".inf"), ("learning_rate", "0"),
                                       ("learning_rate", "-1"), ("reg_weight", "-5"), ("cl_weight", "-1e-4"),
                                       ("keep_rate", ".nan"), ("alpha", "-0.5"), ("seed", "-1"),
                                       ("keep_checkpoints", "0")])
def test_bad_numbers_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: must be"):
        load_config("configs/demo.yaml", [f"{key}={value}"])


def test_a_diverging_loss_stops_with_the_step_and_term(data, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("configs/demo.yaml", {**SMALL, "epochs": 3, "learning_rate": 1e30,
                                            "train_batch_size": 64, "checkpoint_every_steps": 1})
    with pytest.raises(TrainingError, match=r"step (\d+): loss term '(bpr|hcl|reg)' is (nan|inf)") as info:
        train(data, cfg, out)
    step = int(info.value.args[0].split()[1].rstrip(":"))
    assert not (out / "metrics.json").exists()
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts][-1] == f"step-{step:010d}-0"  # the last good step's checkpoint is kept
    state = read_sharded(ckpts[-1], 0)
    assert all(torch.isfinite(v).all() for v in state["engine"]["model"].values())
    for line in (out / "epochs.jsonl").read_text().splitlines():   # strict JSON only
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_a_diverging_loss_stops_every_rank(data, tmp_path):
    """2 gloo ranks: the step's terms are global, so every rank stops at the same step, with an error line."""
    sets = [x for kv in ("epochs=3", "embedding_size=8", "learning_rate=1e30", "train_batch_size=64",
                         "checkpoint_every_steps=1") for x in ("--set", kv)]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "lgmrec_dist.train", "--data", str(data), "--config", "configs/demo.yaml",
                          "--out", str(tmp_path / "run"), *sets], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode != 0
    # the ranks share stderr (their lines may interleave) and torchrun ends the others once one has exited
    assert re.search(r"error: step \d+: loss term '(bpr|hcl|reg)' is (nan|inf)", res.stderr), res.stderr[-3000:]
    assert "_check_finite" not in res.stderr  # no rank printed a traceback (torchrun's own summary aside)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert sorted((tmp_path / "run" / "checkpoints").glob("step-*"))


def test_project_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "m.json", {"loss": math.nan})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# 3. MMRec ids: the id space is checked against the distinct ids before anything is allocated
# --------------------------------------------------------------------------------------------------

def test_sparse_mmrec_ids_are_refused_before_allocating(tmp_path):
    inter = tmp_path / "two.inter"
    inter.write_text("userID\titemID\tx_label\n2000000000\t0\t0\n1\t1\t2\n")
    np.save(tmp_path / "f.npy", np.zeros((2, 4), np.float32))
    # 3 GB of address space: the 2e9-row id map (16 GB) cannot even be attempted
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"
    res = subprocess.run([sys.executable, "-c", f"{limit}\nimport sys\nfrom lgmrec_dist.cli import main\n"
                          "sys.exit(main(sys.argv[1:]))", "import-mmrec", "--inter", str(inter),
                          "--feature", f"image={tmp_path / 'f.npy'}", "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "error:" in res.stderr and "'userID'" in res.stderr and "2 distinct ids" in res.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# 4. what used to end in a traceback
# --------------------------------------------------------------------------------------------------

def test_yaml_tags_and_syntax_errors_name_the_file(tmp_path, data, capsys):
    tag, broken = tmp_path / "tag.yaml", tmp_path / "broken.yaml"
    tag.write_text("alpha: !!python/object/apply:os.system ['true']\n")
    broken.write_text("alpha: [0.1,\n")
    for path in (tag, broken):
        refused(["train", "--data", data, "--out", tmp_path / "r", "--config", path], capsys, str(path))
    refused(["train", "--data", data, "--out", tmp_path / "r", "--set", "alpha=!!python/name:os.system"],
            capsys, "--set alpha=")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00alpha: 1")
    refused(["train", "--data", data, "--out", tmp_path / "r", "--config", binary], capsys, str(binary), "UTF-8")
    assert not (tmp_path / "r").exists()


def test_export_recommend_and_embed_items_refuse_bad_values(run, features, tmp_path, capsys):
    refused(["recommend", "--run", run, "--user", "1", "--k", "-3"], capsys, "--k", ">= 1")
    refused(["export", "--run", run, "--out", tmp_path / "x", "--top-k", "-5"], capsys, "--top-k", ">= 1")
    cold = tmp_path / "cold.parquet"
    pq.write_table(pa.table({"raw_id": ["n1"], "embedding": [[1.0, 2.0, 3.0]]}), cold)
    refused(["export", "--run", run, "--out", tmp_path / "x", "--cold-items", cold], capsys, str(cold), "dimension 3")
    assert not (tmp_path / "x").exists()
    bad = {"empty": pa.table({"item_id": pa.array([], pa.string()), "embedding": pa.array([], pa.list_(pa.float32()))}),
           "mixed": pa.table({"item_id": ["n1", "n2"], "embedding": [[1.0] * 4, [1.0] * 3]}),
           "strings": pa.table({"item_id": ["n1", "n2"], "embedding": [["a"] * 4, ["b"] * 4]})}
    for name, table in bad.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        refused(["embed-items", "--run", run, "--item-features", f"image={tmp_path / f'{name}.parquet'}",
                 "--item-features", f"text={features['text']}", "--out", tmp_path / "c.parquet"],
                capsys, f"{name}.parquet")
    (tmp_path / "dir").mkdir()
    refused(["embed-items", "--run", run, "--item-features", f"image={features['image']}",
             "--item-features", f"text={features['text']}", "--out", tmp_path / "dir"], capsys, "is a directory")
    assert not (tmp_path / "c.parquet").exists() and list((tmp_path / "dir").iterdir()) == []


def test_synth_mmrec_refuses_a_bad_modality_spec(tmp_path, capsys):
    refused(["synth-mmrec", "--out", tmp_path / "s", "--modalities", "image:abc"], capsys, "'image:abc'")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------------
# 5. consistency
# --------------------------------------------------------------------------------------------------

def test_zero_k_is_refused(run, tmp_path, capsys):
    refused(["export", "--run", run, "--out", tmp_path / "x", "--top-k", "0"], capsys, "--top-k")
    refused(["recommend", "--run", run, "--user", "1", "--k", "0"], capsys, "--k")
    assert not (tmp_path / "x").exists()


def test_embed_items_keeps_an_existing_out_and_refuses_an_extra_modality(run, features, tmp_path, capsys):
    out = tmp_path / "cold.parquet"
    argv = ["embed-items", "--run", run, "--item-features", f"image={features['image']}",
            "--item-features", f"text={features['text']}", "--out", out]
    assert cli(argv, capsys)[0] == 0
    before = out.read_bytes()
    refused(argv, capsys, "already exists", "--overwrite")
    assert out.read_bytes() == before
    assert cli(argv + ["--overwrite"], capsys)[0] == 0
    refused(argv[:-2] + ["--item-features", f"audio={features['text']}", "--out", tmp_path / "c2.parquet"],
            capsys, "'audio'")


def test_prep_rerun_verifies_the_output(ray_cluster, tmp_path, capsys):
    from data_prep.prep import prep
    from data_prep.synth_parquet import make_parquet_synthetic
    raw = tmp_path / "raw"
    make_parquet_synthetic(raw, 40, 20, 400, {"image": 4}, seed=1)
    args = (raw / "interactions", {"image": raw / "features" / "image.parquet"}, tmp_path / "out")
    prep(*args, kcore=1, progress=False)
    prep(*args, kcore=1)
    assert "nothing to do" in capsys.readouterr().out
    feat = tmp_path / "out" / "features" / "image.npy"
    blob = bytearray(feat.read_bytes())
    blob[-1] ^= 0xFF
    feat.write_bytes(bytes(blob))
    with pytest.raises(Exception, match=r"checksum mismatch for features/image.npy.*--overwrite"):
        prep(*args, kcore=1, progress=False)


# --------------------------------------------------------------------------------------------------
# 6. no leftovers
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["device=cuda", "alpha=.nan", "valid_metric=recall@7"])
def test_a_refused_train_leaves_no_run_directory(override, data, tmp_path, capsys):
    if override == "device=cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is not refused")
    refused(["train", "--data", data, "--out", tmp_path / "run", "--set", override], capsys)
    assert not (tmp_path / "run").exists()


def test_stale_temporaries_are_removed_at_start_up(interrupted, data, capsys):
    stale = [interrupted / "checkpoints" / ".step-0000000009-0.tmp", interrupted / ".best.tmp",
             interrupted / ".best.old"]
    for p in stale:
        p.mkdir()
        (p / "rank-0.pt").write_bytes(b"half")
    (interrupted / ".metrics.json.x1y2.tmp").write_text("{")
    rc, err = cli(["train", "--data", data, "--out", interrupted, "--config", "configs/demo.yaml",
                   "--set", "epochs=2", "--set", "embedding_size=8", "--set", "train_batch_size=512"], capsys)
    assert rc == 0, err
    assert not [p for p in stale if p.exists()] and not list(interrupted.glob(".*.tmp"))
    assert (interrupted / "metrics.json").is_file()


def test_a_killed_dataset_write_leaves_nothing_the_next_one_keeps(tmp_path):
    from lgmrec_dist.dataset import atomic_directory
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".ds.tmp-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "interactions.parquet").write_bytes(b"half")
    live = tmp_path / f".ds.tmp-{os.getpid()}-xyz"      # a writer that is still running: kept
    live.mkdir()
    with atomic_directory(tmp_path / "ds") as tmp:
        (tmp / "a").write_text("a")
    assert not stale.exists() and live.exists() and (tmp_path / "ds" / "a").is_file()


# --------------------------------------------------------------------------------------------------
# the one error path
# --------------------------------------------------------------------------------------------------

def test_every_subcommand_refuses_bad_values_with_one_error_line(ray_cluster, run, data, features, tmp_path, capsys):
    """Each subcommand with a bad value of each kind of argument: path, integer, NAME=PATH, key=value."""
    t = tmp_path
    nope = t / "nope"
    cases = [
        ["train", "--data", nope, "--out", t / "r"],
        ["train", "--data", data, "--out", t / "r", "--config", nope],
        ["train", "--data", data, "--out", t / "r", "--set", "epochs=-1"],
        ["train", "--data", data, "--out", t / "r", "--set", "alpha"],
        ["train", "--data", data, "--out", t / "r", "--set", "nokey=1"],
        ["train", "--data", data, "--out", t / "r", "--set", "epochs=many"],
        ["train", "--data", data, "--out", t / "r", "--nproc", "-2"],
        ["train", "--data", data, "--out", t / "r", "--nproc", "two"],
        ["train", "--data", data, "--out", features["image"]],
        ["import-mmrec", "--inter", nope, "--feature", f"image={nope}", "--out", t / "m"],
        ["import-mmrec", "--inter", nope, "--feature", "image", "--out", t / "m"],
        ["export-mmrec", "--data", nope, "--out", t / "m"],
        ["export-mmrec", "--data", data, "--out", t / "m", "--name", "a/b"],
        ["synth-mmrec", "--out", t / "s", "--users", "-5"],
        ["synth-mmrec", "--out", t / "s", "--seed", "-1"],
        ["synth-mmrec", "--out", t / "s", "--modalities", "image:0"],
        ["synth", "--out", t / "s", "--users", "-5", "--items", "5", "--interactions", "20"],
        ["synth", "--out", t / "s", "--users", "5", "--items", "5", "--interactions", "20", "--modalities", "x:y"],
        ["prep", "--interactions", nope, "--item-features", f"image={nope}", "--out", t / "p"],
        ["prep", "--interactions", nope, "--item-features", "image", "--out", t / "p"],
        ["prep", "--interactions", nope, "--item-features", f"image={nope}", "--out", t / "p", "--kcore", "-1"],
        ["prep", "--interactions", nope, "--item-features", f"image={nope}", "--out", t / "p", "--partitions", "0"],
        ["extract", "--items", nope, "--out", t / "e.parquet", "--text-col", "title"],
        ["extract", "--items", features["image"], "--out", t / "e.parquet", "--text-col", "t", "--batch-size", "-1"],
        ["export", "--run", nope, "--out", t / "x"],
        ["export", "--run", run, "--out", t / "x", "--cold-items", nope],
        ["export", "--run", run, "--out", t / "x", "--top-k", "-1"],
        ["recommend", "--run", nope, "--user", "1"],
        ["recommend", "--run", run, "--user", "no-such-user"],
        ["recommend", "--run", run, "--user", "1", "--k", "x"],
        ["embed-items", "--run", nope, "--item-features", f"image={features['image']}", "--out", t / "c.parquet"],
        ["embed-items", "--run", run, "--item-features", "image", "--out", t / "c.parquet"],
        ["embed-items", "--run", run, "--item-features", f"image={nope}", "--out", t / "c.parquet"],
        ["embed-items", "--run", run, "--item-features", f"image={features['image']}", "--out", t / "c.parquet"],
        ["report", nope],
        ["sweep", "--data", data, "--out", t / "sw", "--grid", "alpha"],
        ["sweep", "--data", data, "--out", t / "sw", "--grid", "alpha=.nan"],
        ["sweep", "--data", data, "--out", t / "sw", "--grid", "alpha=0.1", "--max-concurrent", "-1"],
        ["ray-train", "--data", data, "--out", t / "rt", "--num-workers", "-1"],
        ["ray-train", "--data", data, "--out", t / "rt", "--set", "learning_rate=0"],
    ]
    for argv in cases:
        refused(argv, capsys)
    assert sorted(p.name for p in t.iterdir()) == ["image.parquet", "text.parquet"]  # nothing written


def test_unexpected_errors_keep_their_traceback():
    def bug(_):
        raise RuntimeError("a bug")

    def io_error(_):
        raise OSError(errno.EIO, "Input/output error")

    for func, kind in ((bug, RuntimeError), (io_error, OSError)):
        with pytest.raises(kind):
            guarded(func, None)


def test_permission_denied_is_one_error_line(data, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions (the read-only disk test covers a refused write)")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    refused(["train", "--data", data, "--out", locked / "run"], capsys, "Permission denied")


def test_a_read_only_disk_is_one_error_line(data, run, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk.path)], check=True)
    refused(["train", "--data", data, "--out", small_disk.path / "run"], capsys, "Read-only file system")
    refused(["export", "--run", run, "--out", small_disk.path / "x"], capsys, "Read-only file system")


# --------------------------------------------------------------------------------------------------
# a full disk: a real tmpfs
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs; ``fill()`` then takes all of its free space."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or res.returncode})")

    class Disk:
        path = mnt

        @staticmethod
        def fill():
            with contextlib.suppress(OSError), open(mnt / "filler", "wb", buffering=0) as fh:
                while True:
                    fh.write(b"\0" * 4096)

    try:
        yield Disk
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def no_space(argv, capsys) -> str:
    return refused(argv, capsys, "No space left on device")


def test_full_disk_prep_keeps_the_previous_dataset(ray_cluster, small_disk, tmp_path, capsys):
    from data_prep.synth_parquet import make_parquet_synthetic
    raw = tmp_path / "raw"
    make_parquet_synthetic(raw, 60, 30, 600, {"image": 64}, seed=1)
    out = small_disk.path / "data"
    argv = ["prep", "--interactions", raw / "interactions", "--item-features",
            f"image={raw / 'features' / 'image.parquet'}", "--out", out, "--kcore", "1"]
    assert cli(argv, capsys)[0] == 0
    before = snapshot(out)
    small_disk.fill()
    no_space(argv[:-1] + ["2", "--overwrite"], capsys)
    assert snapshot(out) == before
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["data", "filler"]


def test_full_disk_import_keeps_the_previous_dataset(small_disk, tmp_path, capsys):
    src = make_mmrec_synthetic(tmp_path / "mm", 60, 40, 600, {"image": 64}, seed=2)
    out = small_disk.path / "data"
    argv = ["import-mmrec", "--inter", src / "synthetic.inter", "--feature", f"image={src / 'image_feat.npy'}",
            "--out", out]
    assert cli(argv, capsys)[0] == 0
    before = snapshot(out)
    small_disk.fill()
    no_space(argv + ["--overwrite"], capsys)
    assert snapshot(out) == before
    PreparedDataset.load(out)
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["data", "filler"]


def test_full_disk_checkpoint_keeps_the_last_good_one(run, data, small_disk, capsys):
    out = small_disk.path / "run"
    shutil.copytree(run, out)
    (out / "metrics.json").unlink()
    good = sorted((out / "checkpoints").glob("step-*"))
    before = {p: snapshot(p) for p in (*good, out / "best")}
    small_disk.fill()
    line = no_space(["train", "--data", data, "--out", out, "--config", "configs/demo.yaml", "--set", "epochs=2",
                     "--set", "embedding_size=8", "--set", "train_batch_size=512"], capsys)
    assert "rank-0.pt" in line
    assert {p: snapshot(p) for p in before} == before
    assert not (out / "metrics.json").exists()
    read_sharded(good[-1], 0)


def test_full_disk_export_keeps_the_previous_export(run, features, small_disk, capsys):
    out, cold = small_disk.path / "export", small_disk.path / "cold.parquet"
    argv = ["export", "--run", run, "--out", out, "--top-k", "5"]
    embed = ["embed-items", "--run", run, "--item-features", f"image={features['image']}",
             "--item-features", f"text={features['text']}", "--out", cold]
    assert cli(argv, capsys)[0] == 0 and cli(embed, capsys)[0] == 0
    before = snapshot(out), cold.read_bytes()
    small_disk.fill()
    no_space(argv + ["--overwrite"], capsys)
    no_space(embed + ["--overwrite"], capsys)
    assert (snapshot(out), cold.read_bytes()) == before
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["cold.parquet", "export", "filler"]
