"""The HTTP JSON application of ``lgmrec serve`` (docs/serving.md): FastAPI routes over a Recommender.

    GET  /healthz                          {"status": "ok", "users": .., "items": .., "ann": ..}
    GET  /recommend?user=RAW_ID&k=K        a known user's top-K, training items excluded
    POST /recommend    {"items": [RAW_ITEM_IDS], "k": K}          a new user, by fold-in
    POST /items/embed  {"ids": [..], "features": {MODALITY: [[..], ..]}}   new items (cold start)

Bad requests get a 4xx with {"detail": message}: unknown ids 404, k out of range / malformed JSON /
wrong shapes 422, bodies over ``MAX_BODY_BYTES`` 413. It binds to loopback unless --host says otherwise.
"""
from __future__ import annotations

import numpy as np
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from lgmrec_dist.dataset import DatasetError
from lgmrec_dist.recommender import Recommender, UnknownIds

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_BODY_BYTES = 1 << 20


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 and never reaches the application
    (chunked bodies without Content-Length included). The rest of such a body is read and dropped, up
    to ``DRAIN_FACTOR`` × ``limit``, so that a client still sending sees the 413 rather than a reset
    connection; a body declared larger than that gets the 413 at once."""

    DRAIN_FACTOR = 16

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.DRAIN_FACTOR * self.limit:
            return await self._too_large(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.limit:
                chunks = None                     # over the limit: keep reading, keep nothing
                if size > self.DRAIN_FACTOR * self.limit:
                    break
            elif chunks is not None:
                chunks.append(message.get("body", b""))
        if chunks is None:
            return await self._too_large(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        await JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)(scope, receive, send)


class History(BaseModel):
    items: list[str | int] = Field(min_length=1, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=MAX_K)


class NewItems(BaseModel):
    ids: list[str | int] = Field(min_length=1, max_length=MAX_HISTORY)
    features: dict[str, list[list[float]]]


def _rows(rows: list[tuple]) -> list[dict]:
    return [{"rank": r, "item": item, "score": score} for r, item, score in rows]


def create_app(rec: Recommender, max_body: int = MAX_BODY_BYTES):
    app = FastAPI(title="lgmrec serve")

    @app.exception_handler(UnknownIds)
    async def _unknown(_request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(DatasetError)
    async def _bad(_request, exc):
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "users": len(rec.user_raw), "items": rec.num_items,
                "ann": None if rec.ann is None else rec.ann.kind}

    @app.get("/recommend")
    def recommend_known(user: str = Query(min_length=1), k: int = Query(10, ge=1, le=MAX_K)):
        return {"user": rec.user_raw[rec.user_row(user)], "items": _rows(rec.recommend_user(user, k))}

    @app.post("/recommend")
    def recommend_new(body: History):
        return {"items": _rows(rec.recommend_history(body.items, body.k))}

    @app.post("/items/embed")
    def embed(body: NewItems):
        feats = {}
        for m, rows in body.features.items():
            x = np.asarray(rows, np.float32) if rows else np.zeros((0, 0), np.float32)
            if x.ndim != 2 or len(x) != len(body.ids):
                raise DatasetError(f"features[{m!r}]: expected {len(body.ids)} rows of equal length")
            if not np.isfinite(x).all():
                raise DatasetError(f"features[{m!r}]: NaN/inf values")
            feats[m] = x
        emb = rec.embed_items(feats)
        return {"items": [{"id": i, "embedding": e} for i, e in zip(body.ids, emb.tolist())]}

    return BodyLimit(app, max_body)
