"""Run by tests/test_distributed.py under torchrun (real gloo process group, 2 processes).

Each rank writes rank<R>.pt into OUT: its owned CGE rows at initialisation, the global loss terms of
each step, its owned embedding rows after the steps (with their global ids), the dense parameters, and
the distributed evaluation metrics of the trained model.
"""
import sys

import numpy as np
import torch

from lgmrec_dist.batches import TripleSampler
from lgmrec_dist.config import load_config
from lgmrec_dist.dataset import TRAIN, PreparedDataset
from lgmrec_dist.distributed.group import close_process_group, init_process_group
from lgmrec_dist.distributed.sharded import LocalGraph
from lgmrec_dist.engines import build_engine
from lgmrec_dist.train import make_evaluators


def main(data, out, ownership, steps, overrides):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    ctx = init_process_group("cpu")
    ds = PreparedDataset.load(data)
    cfg = load_config(None, overrides)
    # non-contiguous ownership given as a node_part.npy file (random, METIS)
    part = np.load(ownership) if ownership != "contiguous" else None
    eng = build_engine(cfg, ds, ctx, partition=part)
    m = eng.model
    owned = torch.from_numpy(eng.own.owned)
    with torch.no_grad():
        cge0 = m.cge().clone()
    tu, ti = ds.pairs(TRAIN)
    # interactions are a set: the same pairs logged twice (and in another order) make the same local graph,
    # and so does a build in blocks of 7 edges: the same entries in the same order, bit for bit
    twice = LocalGraph(eng.own, ds.num_users, ds.num_items, np.concatenate([tu, tu[::-1]]),
                       np.concatenate([ti, ti[::-1]]), torch.device("cpu"), block=7)
    same_graph = all(torch.equal(getattr(getattr(twice, k), part)(), getattr(getattr(m.graph, k), part)())
                     for k in ("norm_adj", "norm_adj_t", "R", "P", "R_t", "P_t")
                     for part in ("crow_indices", "col_indices", "values"))
    users, pos, neg = (torch.from_numpy(a) for a in TripleSampler(ds.num_items, tu, ti, cfg.seed).epoch(0))
    losses = []
    for b in range(steps):
        sl = slice(b * cfg.train_batch_size, (b + 1) * cfg.train_batch_size)
        losses.append(eng.step(users[sl], pos[sl], neg[sl], b))
    valid_eval, test_eval = make_evaluators(ds, cfg)
    emb = eng.embeddings()
    torch.save({"owned": owned, "cge0": cge0, "losses": losses,
                "user_ids": m.user_ids, "user_embedding": m.user_embedding.detach(),
                "item_ids": m.item_ids, "item_embedding": m.item_embedding.detach(),
                "dense": {k: v.detach() for k, v in m.dense_parameters().items()},
                "dense_grad": {k: v.grad.clone() for k, v in m.dense_parameters().items()},   # of the last step
                "valid": eng.evaluate(valid_eval, emb), "test": eng.evaluate(test_eval, emb),
                "halo": m.graph.num_halo, "same_graph_with_duplicates": same_graph}, f"{out}/rank{ctx.rank}.pt")
    eng.close()
    close_process_group()


if __name__ == "__main__":
    data, out, ownership, steps, *kv = sys.argv[1:]
    main(data, out, ownership, int(steps), kv)  # kv: config overrides as key=value strings
