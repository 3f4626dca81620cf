"""Direct form of LGMRec's forward pass and loss, written as the spec (and the official code) states it.

Nothing here is used for training: it is the yardstick the speed rewrites of :mod:`lgmrec_dist.model`
are tested against (same parameters, same random draws, same loss and gradients to float tolerance),
and the "official design" side of the benchmarks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lgmrec_dist.graph import spmm
from lgmrec_dist.model.lgmrec import TAU, LGMRec
from lgmrec_dist.model.losses import infonce_direct


def reference_forward(model: LGMRec, step: int, train: bool = True):
    """Full-graph E* (N × d) and per-modality materialised global embeddings [(G_U^m, G_I^m)] (§1.4-1.7)."""
    cfg, g = model.cfg, model.graph
    ego = torch.cat([model.user_embedding, model.item_embedding])
    layers = [ego]
    if cfg.cf_model == "lightgcn":
        for _ in range(cfg.n_ui_layers):
            layers.append(torch.sparse.mm(g.norm_adj, layers[-1]))
    e_c = torch.stack(layers, dim=1).mean(dim=1)
    e = e_c
    if cfg.use_mge:
        for m in model.modalities:
            f_i = model.features[m] @ model.proj[m]
            f_u = torch.sparse.mm(g.R, f_i) * (1.0 / (g.deg[:model.num_users] + 1e-7)).unsqueeze(1)
            f = torch.cat([f_u, f_i])
            for _ in range(cfg.n_mm_layers):
                f = torch.sparse.mm(g.norm_adj, f)
            e = e + F.normalize(f)
    globals_ = []
    if cfg.use_ghe:
        for k, m in enumerate(model.modalities):
            noise, masks = model._draws(step, k, train)
            z_i = model.features[m] @ model.hyper[m]
            z_u = spmm(g.R, g.R_t, z_i)
            h_i = F.softmax((z_i + (noise[0] if noise else 0)) / TAU, dim=1)
            h_u = F.softmax((z_u + (noise[1] if noise else 0)) / TAU, dim=1)
            if masks is not None:
                h_i, h_u = h_i * masks[0] / cfg.keep_rate, h_u * masks[1] / cfg.keep_rate
            i_ret = e_c[model.num_users:]
            for _ in range(cfg.n_hyper_layer):
                lat = h_i.t() @ i_ret
                i_ret = h_i @ lat
                u_ret = h_u @ lat
            globals_.append((u_ret, i_ret))
        ghe = sum(torch.cat([u, i]) for u, i in globals_)
        e = e + cfg.alpha * F.normalize(ghe)
    return e, globals_


def reference_loss(model: LGMRec, users, pos, neg, step: int) -> dict:
    """§1.8 loss on the direct forward: BPR mean, HCL sum (duplicates included), plain-norm regulariser."""
    cfg, n_u = model.cfg, model.num_users
    e, globals_ = reference_forward(model, step)
    u, p, n = e[users], e[n_u + pos], e[n_u + neg]
    bpr = -torch.log(torch.sigmoid((u * p).sum(1) - (u * n).sum(1))).mean()
    reg = (torch.norm(u, p=2) + torch.norm(p, p=2) + torch.norm(n, p=2)) / len(users)
    hcl = torch.zeros(())
    if cfg.use_ghe and cfg.cl_weight > 0:
        for (uv, iv), (ut, it) in zip(globals_[:-1], globals_[1:]):
            hcl = hcl + infonce_direct(uv, ut, users, TAU) + infonce_direct(iv, it, pos, TAU)
    loss = bpr + cfg.cl_weight * hcl + cfg.reg_weight * reg
    return {"loss": loss, "bpr": bpr, "hcl": hcl, "reg": reg}
