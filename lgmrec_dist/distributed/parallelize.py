"""Distribution applied to the one model from outside (docs/distributed.md, "Engines"): a rank's
:class:`~lgmrec_dist.model.LGMRec` holds its owned rows only, reads them through the row-sharded tables
(``distributed.tables``), propagates over its rows of Ĝ with halo exchange (``distributed.sharded.LocalGraph``)
and sums its global terms over ranks (``distributed.sharded.ShardedRows``). The model's code is the
single-process model's; only these pieces differ."""
from __future__ import annotations

import numpy as np
import torch

from lgmrec_dist.distributed.exchange import Ownership
from lgmrec_dist.distributed.sharded import ShardedRows
from lgmrec_dist.distributed.tables import ShardedFeatureTables
from lgmrec_dist.model import LGMRec, ModelParams


def shard_model(hp: ModelParams, num_users: int, num_items: int, feature_dims: dict[str, int], own: Ownership,
                train_users: np.ndarray, train_items: np.ndarray, features: dict[str, torch.Tensor],
                device: torch.device, user_sums: bool = False) -> LGMRec:
    """This rank's LGMRec: its rows of E_U, E_I drawn from their keyed streams (equal to the whole model's
    rows), the owned rows of X_m (``features``, tensors in item id order) and the training edges incident to
    the owned nodes (``train_users/items``; any superset, such as every edge, gives the same model)."""
    placement = ShardedRows(own, num_users, device)
    model = LGMRec(hp, num_users, num_items, feature_dims, (placement.user_ids.cpu(), placement.item_ids.cpu()))
    tables = ShardedFeatureTables(hp, own, num_users, num_items, features, device, train_users, train_items,
                                  user_sums)
    return model.to(device).attach(tables.graph, tables, placement)
