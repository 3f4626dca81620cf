"""The trained parameters of one process, keyed for ``best/`` and export (docs/checkpoints.md): rows of
E_U and E_I with their global ids, and the replicated dense parameters W_m (``proj.m``), V_m (``hyper.m``).
Export puts the ranks' rows together by id, so each engine says which rows it writes, nothing more."""
from __future__ import annotations

import torch


def model_payload(user_ids, user_rows: torch.Tensor, item_ids, item_rows: torch.Tensor, dense: dict) -> dict:
    """``dense``: name -> tensor of the replicated parameters (written by every rank, identical)."""
    cpu = lambda t: torch.as_tensor(t).detach().cpu()  # noqa: E731
    return {"user_ids": cpu(user_ids), "user_embedding": cpu(user_rows),
            "item_ids": cpu(item_ids), "item_embedding": cpu(item_rows),
            "dense": {k: cpu(v) for k, v in dense.items()}}
