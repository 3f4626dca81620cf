"""The Ray side of ``lgmrec extract``: the reader tasks and the encoder actors (docs/extract.md).

:func:`read_shard` turns one planned shard into chunks of ``batch_size`` items (strings ordered by
length, or decoded and cropped images); :class:`EncodeChunks` encodes one chunk per forward pass. A chunk
is always the same rows in the same padded batch, which is what makes a resumed run bit-identical.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep import encoders


def read_shard(batch: pa.Table, spec: dict):
    """Ray task: one input row per shard -> one output row per chunk of ``batch_size`` items.

    Texts are ordered by length within the shard before they are cut into chunks (as
    sentence-transformers does within one ``encode`` call): less padding, same chunks on every run.
    ``pos`` holds each chunk's row positions within the shard.
    """
    for row in batch.to_pylist():
        path = spec["files"][row["file"]]
        table = pq.ParquetFile(path).read_row_groups(row["row_groups"], columns=spec["columns"])
        table = table.slice(row["offset"], row["length"])
        n, b = table.num_rows, spec["batch_size"]
        shard, chunks = row["shard"], math.ceil(table.num_rows / b)
        if spec["kind"] == "text":
            texts = encoders.join_text_columns([table.column(c) for c in spec["columns"]])
            order = np.array(sorted(range(n), key=lambda i: (-len(texts[i]), i)), np.int32)
            yield pa.table({"shard": pa.array([shard] * chunks, pa.int64()),
                            "chunk": pa.array(range(chunks), pa.int64()),
                            "n": pa.array([min(b, n - c * b) for c in range(chunks)], pa.int64()),
                            "pos": pa.array([order[c * b:(c + 1) * b].tobytes() for c in range(chunks)],
                                            pa.binary()),
                            "text": pa.array([[texts[i] for i in order[c * b:(c + 1) * b]] for c in range(chunks)],
                                             pa.list_(pa.large_string()))})
        else:
            values = table.column(spec["columns"][0]).to_pylist()
            pixels, oks, sizes = [], [], []
            for c in range(chunks):
                good, ok = [], []
                for v in values[c * b:(c + 1) * b]:
                    try:
                        good.append(encoders.preprocess_image(encoders.load_image_bytes(v, spec["image_root"])))
                        ok.append(True)
                    except Exception:  # unreadable: counted by the driver, never fatal
                        ok.append(False)
                arr = np.stack(good) if good else np.zeros((0, encoders.CROP, encoders.CROP, 3), np.uint8)
                pixels.append(arr.tobytes())
                oks.append(np.asarray(ok, np.bool_).tobytes())
                sizes.append(len(ok))
            yield pa.table({"shard": pa.array([shard] * chunks, pa.int64()),
                            "chunk": pa.array(range(chunks), pa.int64()),
                            "n": pa.array(sizes, pa.int64()),
                            "pos": pa.array([np.arange(c * b, c * b + sizes[c], dtype=np.int32).tobytes()
                                             for c in range(chunks)], pa.binary()),
                            "ok": pa.array(oks, pa.binary()),
                            "pixels": pa.array(pixels, pa.large_binary())})


class EncodeChunks:
    """Ray actor (callable class for ``map_batches``): loads the encoder once, encodes one chunk per row."""

    def __init__(self, spec: dict):
        encoders.set_offline()
        import torch

        # the same thread count in every actor, whatever the worker layout: MKL's GEMM rounds differently
        # with 1 and 2 threads (measured: up to 1.7e-7 apart on MiniLM), and a resumed run must give
        # the bits of an uninterrupted one
        torch.set_num_threads(max(1, int(spec["threads"])))
        self.kind = spec["kind"]
        device = "cuda" if spec["gpus"] > 0 and torch.cuda.is_available() else "cpu"
        if self.kind == "text":
            self.encoder = encoders.TextEncoder(spec["model"], device)
        else:
            self.encoder = encoders.ImageEncoder(spec["model"], spec["arch"], device)
        self.dim = self.encoder.dim

    def __call__(self, batch: pa.Table) -> pa.Table:
        embs, oks = [], []
        for i in range(batch.num_rows):
            n = batch.column("n")[i].as_py()
            if self.kind == "text":
                emb = self.encoder.encode(batch.column("text")[i].as_py())
                ok = np.ones(n, np.bool_)
            else:
                ok = np.frombuffer(batch.column("ok")[i].as_py(), np.bool_)
                pix = np.frombuffer(batch.column("pixels")[i].as_py(), np.uint8)
                pix = pix.reshape(-1, encoders.CROP, encoders.CROP, 3)
                emb = np.zeros((n, self.dim), np.float32)
                emb[ok] = self.encoder.encode(pix)
            embs.append(emb.astype(np.float32, copy=False).tobytes())
            oks.append(ok.tobytes())
        return pa.table({"shard": batch.column("shard"), "chunk": batch.column("chunk"), "n": batch.column("n"),
                         "pos": batch.column("pos"), "dim": pa.array([self.dim] * batch.num_rows, pa.int64()),
                         "ok": pa.array(oks, pa.binary()), "emb": pa.array(embs, pa.large_binary())})

