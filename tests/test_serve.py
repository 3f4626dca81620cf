"""`lgmrec serve` against a real uvicorn on 127.0.0.1 with a real HTTP client (urllib): known users equal
`lgmrec recommend`, fold-in reproduces trained users, every class of bad request is a 4xx with a message,
`/items/embed` equals `lgmrec embed-items`."""
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil  # a dependency of ray
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lgmrec_dist.api import MAX_BODY_BYTES, MAX_K, create_app
from lgmrec_dist.cli import main as cli
from lgmrec_dist.export import recommend, recommend_users
from lgmrec_dist.recommender import Recommender
from lgmrec_dist.serve import start_background
from lgmrec_dist.config import load_config
from lgmrec_dist.train import make_evaluators

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rec(trained_run):
    return Recommender.from_run(trained_run)


@pytest.fixture(scope="module")
def url(rec):
    server, port = start_background(create_app(rec))
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True


def call(url, path, body=None, raw: bytes | None = None, method=None):
    """(status, parsed JSON body) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def history(rec, u):
    indptr, indices = rec.train_csr
    return indices[indptr[u]:indptr[u + 1]]


def test_healthz_and_known_users_equal_recommend(trained_run, rec, url):
    status, body = call(url, "/healthz")
    assert status == 200 and body == {"status": "ok", "users": 1000, "items": 1000, "ann": None}
    for user in ("0", "3", "517"):
        status, body = call(url, f"/recommend?user={user}&k=10")
        assert status == 200
        want = recommend(trained_run, user, 10)
        assert [(r["rank"], r["item"]) for r in body["items"]] == [(r, i) for r, i, _ in want]
        assert np.allclose([r["score"] for r in body["items"]], [s for _, _, s in want], atol=1e-6)
        assert not set(r["item"] for r in body["items"]) & set(history(rec, int(user)).tolist())


def test_fold_in_is_exact_given_the_ego_embedding(rec):
    """The fold-in formula with a trained user's own E⁰ and training history is its trained E*."""
    hist = [history(rec, u) for u in range(len(rec.user_raw))]
    got = rec.fold.user_embeddings(hist, ego=rec.model.user_embedding.detach())
    assert torch.allclose(got, rec.user_emb, atol=1e-5, rtol=1e-5)


def test_fold_in_of_a_known_history_is_close_to_the_trained_user(trained_run, rec, url, signal_dataset):
    k, users = 20, np.arange(len(rec.user_raw))
    folded = rec.fold.user_embeddings([history(rec, u) for u in users])
    _, trained_top = recommend_users(users, rec.user_emb, rec.item_emb, rec.train_csr, k)
    _, folded_top = recommend_users(users, folded, rec.item_emb, rec.train_csr, k)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(trained_top.tolist(), folded_top.tolist())])
    from lgmrec_dist.dataset import PreparedDataset
    _, test_eval = make_evaluators(PreparedDataset.load(signal_dataset), load_config(trained_run / "config.yaml"))
    r_trained = test_eval.evaluate_metrics(rec.user_emb, rec.item_emb)["recall@20"]
    r_folded = test_eval.evaluate_metrics(folded, rec.item_emb)["recall@20"]
    print(f"fold-in of training histories: top-20 overlap {overlap:.3f}; test recall@20 "
          f"{r_folded:.4f} folded vs {r_trained:.4f} trained")
    assert overlap > 0.85            # measured 0.96 (4 epochs, d = 16)
    assert r_folded > 0.95 * r_trained  # measured within 1%
    # the HTTP path gives the same list as the library
    for u in (5, 42):
        status, body = call(url, "/recommend", {"items": history(rec, u).tolist(), "k": k})
        assert status == 200
        assert [r["item"] for r in body["items"]] == [r[1] for r in rec.recommend_history(history(rec, u).tolist(), k)]
        assert [r["item"] for r in body["items"]] == [rec.item_raw[i] for i in folded_top[u].tolist()]
    # raw ids as text work as well as numbers; the history itself is excluded
    status, body = call(url, "/recommend", {"items": ["1", "2", "3"], "k": 5})
    assert status == 200 and len(body["items"]) == 5 and not {1, 2, 3} & {r["item"] for r in body["items"]}


@pytest.mark.parametrize("path, body, raw, code, words", [
    ("/recommend?user=no-such-user", None, None, 404, "no-such-user"),
    ("/recommend?user=3&k=0", None, None, 422, "k"),
    (f"/recommend?user=3&k={MAX_K + 1}", None, None, 422, "k"),
    ("/recommend?user=3&k=ten", None, None, 422, "k"),
    ("/recommend", None, None, 422, "user"),
    ("/recommend", {"items": [1, "nope", 99999], "k": 5}, None, 404, "2 item id(s)"),
    ("/recommend", {"items": [], "k": 5}, None, 422, "items"),
    ("/recommend", {"items": [1, 2], "k": -3}, None, 422, "k"),
    ("/recommend", {"k": 5}, None, 422, "items"),
    ("/recommend", None, b'{"items": [1, 2', 422, "JSON"),
    ("/recommend", None, b"not json", 422, "JSON"),
    ("/recommend", None, json.dumps({"items": list(range(300_000))}).encode(), 413, "bytes"),
    ("/items/embed", {"ids": ["a"], "features": {"image": [[0.0] * 64]}}, None, 422, "missing ['text']"),
    ("/items/embed", {"ids": ["a"], "features": {"image": [[0.0] * 63], "text": [[0.0] * 32]}}, None, 422, "dimension 63"),
    ("/items/embed", {"ids": ["a", "b"], "features": {"image": [[0.0] * 64], "text": [[0.0] * 32]}}, None, 422, "2 rows"),
    ("/items/embed", None, b'{"ids": ["a"], "features": {"image": [[NaN]], "text": [[0.0]]}}', 422, "NaN"),
    ("/nowhere", None, None, 404, "Not Found"),
])
def test_bad_requests_get_a_4xx_with_a_message(url, path, body, raw, code, words):
    status, reply = call(url, path, body, raw)
    assert status == code, reply
    assert words in json.dumps(reply)


def test_oversized_chunked_body_is_refused(url):
    """A body without Content-Length (chunked) is counted as it arrives."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    chunk = b"[" + b"1," * 100_000
    conn.request("POST", "/recommend", body=iter([chunk] * (MAX_BODY_BYTES // len(chunk) + 2)),
                 headers={"Content-Type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and b"bytes" in resp.read()


def test_items_embed_equals_embed_items(trained_run, rec, url, tmp_path, signal_dataset):
    from lgmrec_dist.dataset import PreparedDataset
    feats = {m: np.asarray(x[:7]) for m, x in PreparedDataset.load(signal_dataset).features.items()}
    ids = [f"new{i}" for i in range(7)]
    args = ["embed-items", "--run", str(trained_run), "--out", str(tmp_path / "cold.parquet")]
    for m, x in feats.items():
        pq.write_table(pa.table({"item_id": ids, "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(x.ravel()), x.shape[1])}), tmp_path / f"{m}.parquet")
        args += ["--item-features", f"{m}={tmp_path / f'{m}.parquet'}"]
    assert cli(args) == 0
    want = np.stack(pq.read_table(tmp_path / "cold.parquet")["embedding"].to_numpy(zero_copy_only=False))
    status, body = call(url, "/items/embed", {"ids": ids, "features": {m: x.tolist() for m, x in feats.items()}})
    assert status == 200 and [r["id"] for r in body["items"]] == ids
    assert np.allclose([r["embedding"] for r in body["items"]], want, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_on_loopback_and_refuses_a_bad_run(trained_run, tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lgmrec_dist", "serve", "--run", str(trained_run), "--port", str(port),
                             "--threads", "1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status, body = call(f"http://127.0.0.1:{port}", "/healthz")
                break
            except urllib.error.URLError:
                time.sleep(0.3)
        assert status == 200 and body["status"] == "ok", proc.stderr.read() if proc.poll() is not None else ""
        listening = [c for c in psutil.Process(proc.pid).net_connections() if c.status == "LISTEN"]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    res = subprocess.run([sys.executable, "-m", "lgmrec_dist", "serve", "--run", str(tmp_path / "nothing")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error:") and "no best model" in res.stderr



@pytest.mark.parametrize("kind", ["faiss", "hnsw"])
def test_export_ann_index_and_serve_with_it(trained_run, rec, tmp_path, capsys, kind):
    """`export --ann` measures the index's recall@20 against exact top-20; `serve --ann` answers from it."""
    assert cli(["export", "--run", str(trained_run), "--out", str(tmp_path / "exp"), "--top-k", "5", "--ann", kind]) == 0
    assert f"ann {kind}:" in capsys.readouterr().out
    info = json.loads((tmp_path / "exp" / "ann" / "ann.json").read_text())
    print(f"{kind}: {info['search_param']} {info['search']}, recall@20 {info['recall@20']:.4f}")
    assert info["kind"] == kind and info["num_items"] == 1000 and info["recall@20"] >= 0.9
    with_ann = Recommender.from_run(trained_run, tmp_path / "exp" / "ann")
    server, port = start_background(create_app(with_ann))
    try:
        base = f"http://127.0.0.1:{port}"
        assert call(base, "/healthz")[1]["ann"] == kind
        overlaps = []
        for user in range(0, 1000, 50):
            status, body = call(base, f"/recommend?user={user}&k=20")
            assert status == 200 and len(body["items"]) == 20
            got = [r["item"] for r in body["items"]]
            assert not set(got) & set(history(rec, user).tolist())     # exclusions hold under ANN too
            scores = [r["score"] for r in body["items"]]
            assert scores == sorted(scores, reverse=True)
            overlaps.append(len(set(got) & {i for _, i, _ in rec.recommend_user(user, 20)}) / 20)
        print(f"{kind}: served top-20 overlap with exact {np.mean(overlaps):.3f}")
        assert np.mean(overlaps) >= 0.85
        status, body = call(base, "/recommend", {"items": [1, 2, 3], "k": 5})
        assert status == 200 and len(body["items"]) == 5
    finally:
        server.should_exit = True


def test_serve_refuses_a_directory_that_is_not_an_index(trained_run, tmp_path, capsys):
    assert cli(["serve", "--run", str(trained_run), "--ann", str(tmp_path)]) == 2
    assert "not an item index" in capsys.readouterr().err
