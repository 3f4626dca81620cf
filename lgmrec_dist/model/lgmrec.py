"""The LGMRec model (docs/model.md): E* = E_c + Σ_m rownorm(F^m) + α·rownorm(Σ_m G^m), trained with
BPR + λ_c·HCL + λ_r·reg.

This module holds the composition once — the fusion (:func:`fuse`), the objective (:func:`objective`),
the contrastive loss (``losses.contrastive_sum``) and inference — and the model :class:`LGMRec`, the same
plain module in every mode, which reads its inputs through three pieces chosen from outside (docs/model.md,
"One model, interfaces chosen from outside"):

* **propagation**: the graph's ``propagate`` and ``user_sums`` (full CSR ``graph.Graph``; a rank's rows
  with halo exchange, ``distributed.sharded.LocalGraph``);
* **embedding rows and feature products**: a feature source (``feature_tables.FeatureTables`` for the
  whole tables in this process, ``distributed.tables.ShardedFeatureTables`` for row-sharded ones);
* **which rows are held, global sums, contrastive denominators**: a placement (``placement.AllRows`` in
  one process, ``distributed.sharded.ShardedRows`` on P ranks; ``distributed.parallelize`` builds it).

The sampled mode applies its step (``sampled.step``: DGL blocks, sampled denominators) to this model.

Speed rewrites, each checked against the direct spec form in tests/test_model.py:
* MGE rows come from the precomputed Y_m = Ĝ^K [P X_m ; X_m] (``mge.mge_inputs``): a step pays
  |batch rows| × d_m × d instead of |I| × d_m × d plus 2K sparse products.
* Global embeddings are kept as rank-≤A factors (``hypergraph.HyperEmbedding``); the contrastive
  similarities against all users/items cost B·N·A, not B·N·d (``losses.infonce_lowrank``).
* The fused embedding is built only for the batch rows during training.

Random draws of the training (Gumbel noise, dropout masks) are keyed by (seed, step, stream, node id)
(``rng``): a row gets the same value whichever process draws it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgmrec_dist import rng
from lgmrec_dist.graph import Graph
from lgmrec_dist.model.cge import cge
from lgmrec_dist.model.feature_tables import FeatureTables
from lgmrec_dist.model.features import HELD_DTYPES
from lgmrec_dist.model.hypergraph import HyperEmbedding, dependencies_from_logits, hypergraph_propagate
from lgmrec_dist.model.losses import bpr_sum, contrastive_sum, held_rows, reg_from_squares, squared_norms
from lgmrec_dist.model.placement import AllRows
from lgmrec_dist.model.params import ModelParams

TAU = 0.2  # hard-coded in the official code for both Gumbel-softmax and InfoNCE (docs/model.md)

# random streams, per modality m: 4*m + kind
GUMBEL_ITEM, GUMBEL_USER, KEEP_ITEM, KEEP_USER = range(4)
# the initial embedding rows: their own streams at a step no training step takes
INIT_STEP, INIT_USER, INIT_ITEM = -(1 << 30), 0, 1


def keyed_draws(hp: ModelParams, step: int, k: int, train: bool, user_ids: torch.Tensor, item_ids: torch.Tensor):
    """Gumbel noise and keep masks for modality index k at this step, for the given users and items.

    Returns (noise, masks) as used by ``hypergraph.assignments`` (None where not applied). Keyed by
    (seed, step, stream, id): the same node gets the same draw whichever process computes it.
    """
    noise = keep = None
    if train or hp.eval_gumbel_noise:
        noise = (keyed_gumbel(hp, step, k, False, item_ids), keyed_gumbel(hp, step, k, True, user_ids))
    if train and hp.keep_rate < 1.0:
        keep = (keyed_keep(hp, step, k, False, item_ids), keyed_keep(hp, step, k, True, user_ids))
    return noise, keep


def keyed_gumbel(hp: ModelParams, step: int, k: int, user: bool, ids: torch.Tensor) -> torch.Tensor:
    """The Gumbel noise of modality k's user or item dependencies at ``step``, rows ``ids``."""
    stream = 4 * k + (GUMBEL_USER if user else GUMBEL_ITEM)
    return rng.keyed_gumbel(rng.stream_key(hp.seed, step, stream), ids, hp.hyper_num)


def keyed_keep(hp: ModelParams, step: int, k: int, user: bool, ids: torch.Tensor) -> torch.Tensor:
    """The dropout keep mask (booleans) of modality k's user or item dependencies at ``step``, rows ``ids``."""
    stream = 4 * k + (KEEP_USER if user else KEEP_ITEM)
    return rng.keyed_uniform(rng.stream_key(hp.seed, step, stream), ids, hp.hyper_num) < hp.keep_rate


def _xavier(rows: int, cols: int, gen: torch.Generator) -> nn.Parameter:
    w = torch.empty(rows, cols)
    bound = (6.0 / (rows + cols)) ** 0.5
    with torch.no_grad():
        w.uniform_(-bound, bound, generator=gen)
    return nn.Parameter(w)


def _keyed_xavier(seed: int, stream: int, num_rows: int, ids: torch.Tensor, cols: int) -> nn.Parameter:
    """Rows ``ids`` of a Xavier-uniform num_rows × cols table, each row drawn from its keyed stream
    (``rng.keyed_uniform``): an owner draws its rows alone, and they equal the whole table's rows."""
    bound = (6.0 / (num_rows + cols)) ** 0.5
    u = rng.keyed_uniform(rng.stream_key(seed, INIT_STEP, stream), ids.to(torch.int64).cpu(), cols)
    return nn.Parameter((2.0 * u - 1.0) * bound)


def initial_parameters(hp: ModelParams, num_users: int, num_items: int, feature_dims: dict[str, int],
                       rows: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(E_U, E_I, W_m, V_m) at initialisation, Xavier-uniform (docs/distributed.md, "Initial values"): the
    embedding rows from keyed streams (row id -> values), so ``rows`` = (user ids, item ids) draws only
    those rows (an owner's) and every process agrees on them; W_m, V_m from one generator seeded by
    ``seed``, in this order."""
    d, a = hp.embedding_size, hp.hyper_num
    user_ids, item_ids = rows if rows is not None else (torch.arange(num_users), torch.arange(num_items))
    user = _keyed_xavier(hp.seed, INIT_USER, num_users, user_ids, d)
    item = _keyed_xavier(hp.seed, INIT_ITEM, num_items, item_ids, d)
    gen = torch.Generator().manual_seed(hp.seed)
    proj = nn.ParameterDict({m: _xavier(dm, d, gen) for m, dm in feature_dims.items()} if hp.use_mge else {})
    hyper = nn.ParameterDict({m: _xavier(dm, a, gen) for m, dm in feature_dims.items()} if hp.use_ghe else {})
    return user, item, proj, hyper


def global_embeddings(hp: ModelParams, z_items: list[torch.Tensor], graph, q0: torch.Tensor, step: int, train: bool,
                      user_ids: torch.Tensor, item_ids: torch.Tensor, reduce=None) -> list[HyperEmbedding]:
    """GHE of every modality k from its item logits Z_I = ``z_items[k]`` (rows ``item_ids``): user logits
    Z_U = R·Z_I (``graph.user_sums``: the full R, or a rank's rows with halo), Gumbel-softmax and dropout
    with the draws keyed by the node ids, H layers from Q^(0) = ``q0`` (the CGE item rows); ``reduce`` sums
    the partial messages H̄_Iᵀ·Q of the ranks' item rows (None in one process)."""
    out = []
    for k, z in enumerate(z_items):
        noise, masks = keyed_draws(hp, step, k, train, user_ids, item_ids)
        h_item, h_user = dependencies_from_logits(z, graph, TAU, noise, masks, hp.keep_rate)
        out.append(hypergraph_propagate(h_item, h_user, q0, hp.n_hyper_layer, reduce))
    return out


@torch.no_grad()
def inference(model) -> torch.Tensor:
    """E* of every row ``model`` holds (``cge()``, ``ghe(e_c, step, train)``, ``fuse(e_c, hyper)``) at
    inference: no dropout; Gumbel noise only if eval_gumbel_noise, keyed by a negative step that counts
    the inference passes (``eval_calls``, checkpointed)."""
    e_c = model.cge()
    hyper = None
    if model.cfg.use_ghe:
        model.eval_calls += 1
        hyper = model.ghe(e_c, -model.eval_calls, train=False)
    return model.fuse(e_c, hyper, inplace=True)


def fuse(e_c: torch.Tensor, mge, g: torch.Tensor | None, alpha: float, inplace: bool = False) -> torch.Tensor:
    """E* = E_c + Σ_m rownorm(F^m) + α·rownorm(G) at some rows (docs/model.md, fusion): ``mge`` the F^m rows
    (empty without MGE; an iterable, so a caller may make each F^m only when it is added), ``g`` = Σ_m G^m
    rows (None without GHE). ``inplace`` (no autograd; ``e_c``, each F^m and ``g`` are the caller's to
    overwrite) adds every term into ``e_c`` itself: the same sums in the same order, one N × d buffer per
    term instead of one per operation."""
    e = e_c
    for f in mge:
        e = e.add_(F.normalize(f, dim=1, out=f)) if inplace else e + F.normalize(f, dim=1)
    if g is not None:
        e = e.add_(F.normalize(g, dim=1, out=g).mul_(alpha)) if inplace else e + alpha * F.normalize(g, dim=1)
    return e


def objective(e_u, e_p, e_n, hcl: torch.Tensor, batch_size: int, hp: ModelParams, reduce=None, world: int = 1) -> dict:
    """BPR + λ_c·HCL + λ_r·reg of a global batch of ``batch_size`` triples (docs/model.md, objective), from
    this process' triples (e_u, e_p, e_n) and contrastive sum ``hcl``.

    With the triples split over P = ``world`` ranks each rank returns its share and the shares add up to
    the loss: BPR is a sum over the triples / |B|; the regulariser's norms are taken from the squared norms
    summed over ranks (``reduce``, an autograd-aware all-reduce), the same on every rank, so each counts
    1/P of it. In one process (``reduce`` None, ``world`` 1) this is the plain loss."""
    bpr = bpr_sum(e_u, e_p, e_n) / batch_size
    sq = squared_norms(e_u, e_p, e_n)
    reg = reg_from_squares(sq if reduce is None else reduce(sq), batch_size)
    loss = bpr + hp.cl_weight * hcl + hp.reg_weight * reg / world
    return {"loss": loss, "bpr": bpr.detach(), "hcl": hcl.detach(), "reg": reg.detach() / world}


class LGMRec(nn.Module):
    """Parameters: E_U, E_I (ID embeddings), W_m (d_m × d projections), V_m (d_m × A hyperedges).

    The plain model, the same object in every mode (docs/model.md, "One model, interfaces chosen from
    outside"). What it reads comes in through :meth:`attach`, not as parameters: the graph (its
    ``propagate`` and ``user_sums``), a feature source (``held_ego``, ``held_mge``, ``held_mge_rows``,
    ``held_item_logits``; ``model.feature_tables``) and a placement (``model.placement``: which rows are held
    here, how a batch's triples are picked, how global sums are reduced, which denominators are used).
    ``rows`` = (user ids, item ids) draws only those rows of E_U and E_I (a rank's owned rows; its placement
    is then ``distributed.sharded.ShardedRows``, set by ``distributed.parallelize``).
    """

    def __init__(self, hp: ModelParams, num_users: int, num_items: int, feature_dims: dict[str, int],
                 rows: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.cfg = hp
        self.num_users, self.num_items = num_users, num_items
        self.modalities = list(feature_dims)
        self.user_embedding, self.item_embedding, self.proj, self.hyper = initial_parameters(
            hp, num_users, num_items, feature_dims, rows)
        self.whole = rows is None
        self.graph = None
        self.source = None
        self.placement = None
        self.eval_calls = 0

    # ------------------------------------------------------------------ set-up
    def attach(self, graph, source, placement=None) -> "LGMRec":
        """The graph, the feature source and the placement, all on the training device. ``source`` may be
        the features X_m as float32 tensors (name -> |I| × d_m) of a whole graph, whose tables are then built
        here; ``placement`` None: every row is held here (:class:`~lgmrec_dist.model.placement.AllRows`)."""
        device = self.user_embedding.device
        if placement is None:
            if not self.whole:
                raise ValueError("a model that holds some rows needs the placement of those rows")
            placement = AllRows(self.num_users, self.num_items, device)
        if isinstance(graph, Graph):         # a whole graph, built anywhere; a rank's graph is built on the device
            graph = graph.to(device)
        self.graph, self.placement = graph, placement
        if isinstance(source, dict):
            hp = self.cfg
            source = FeatureTables(graph, {m: source[m] for m in self.modalities}, hp.n_mm_layers,
                                   HELD_DTYPES[hp.feature_dtype], hp.use_mge and hp.mge_precompute)
        self.source = source
        return self

    @property
    def features(self) -> dict[str, torch.Tensor]:
        return self.source.x

    @property
    def mge_y(self) -> dict[str, torch.Tensor]:
        return self.source.y

    @property
    def user_ids(self) -> torch.Tensor:
        """Global ids of the users whose rows are held here (all of them in one process)."""
        return self.placement.user_ids

    @property
    def item_ids(self) -> torch.Tensor:
        return self.placement.item_ids

    # ------------------------------------------------------------------ branches
    def cge(self) -> torch.Tensor:
        """E_c of the held nodes (CGE): the held users, then the held items."""
        return cge(self.graph, self.source.held_ego(self), self.cfg.n_ui_layers, self.cfg.cf_model)

    def mge_held(self, m: str) -> torch.Tensor:
        """F^m of the held nodes (MGE)."""
        return self.source.held_mge(m, self.proj[m])

    def _draws(self, step: int, k: int, train: bool):
        return keyed_draws(self.cfg, step, k, train, self.user_ids, self.item_ids)

    def ghe(self, e_c: torch.Tensor, step: int, train: bool) -> list[HyperEmbedding]:
        """Per-modality global embeddings (:func:`global_embeddings`) of the held nodes; the partial messages
        are summed by the placement's ``reduce``."""
        z = [self.source.held_item_logits(m, self.hyper[m]) for m in self.modalities]
        p = self.placement
        return global_embeddings(self.cfg, z, self.graph, e_c[len(p.user_ids):], step, train, p.user_ids,
                                 p.item_ids, p.reduce)

    def fuse(self, e_c: torch.Tensor, hyper, rows: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        """E* at held rows ``rows`` (local indices), or at every held node when None (:func:`fuse`).
        ``inplace`` (inference over every held node, ``e_c`` the caller's): each F^m is made as it is
        added, G summed in place, everything added into ``e_c``."""
        mge = []
        if self.cfg.use_mge:
            mge = (self.mge_held(m) if rows is None else self.source.held_mge_rows(m, rows, self.proj[m])
                   for m in self.modalities)
            mge = mge if inplace else list(mge)
        g = None
        if self.cfg.use_ghe:
            for h in hyper:
                g = h.nodes(rows) if g is None else (g.add_(h.nodes(rows)) if inplace else g + h.nodes(rows))
        # index_select, not e_c[rows]: the same rows (distinct), but its backward is an index_add where
        # advanced indexing's deterministic backward sorts the indices first (~2 ms a step at Baby size)
        return fuse(e_c if rows is None else e_c.index_select(0, rows), mge, g, self.cfg.alpha, inplace)

    # ------------------------------------------------------------------ training / inference
    def batch_loss(self, users, pos, neg, step: int) -> dict:
        """This process' share of the loss terms of the global batch of triples (:func:`objective`): the
        whole loss in one process; on P ranks the shares add up to it."""
        p = self.placement
        e_c = self.cge()
        hyper = self.ghe(e_c, step, train=True) if self.cfg.use_ghe else None
        rows, pick = p.batch_rows(users, pos, neg)
        e_u, e_p, e_n = pick(self.fuse(e_c, hyper, rows))
        if hyper is not None and self.cfg.cl_weight > 0 and len(hyper) > 1:
            hcl = contrastive_sum([h.message for h in hyper], p.anchors(users, pos), held_rows(hyper),
                                  p.denominator(hyper), TAU)
        else:
            hcl = e_u.new_zeros(())
        return objective(e_u, e_p, e_n, hcl, len(users), self.cfg, reduce=p.reduce, world=p.world)

    @torch.no_grad()
    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """E* of the held users and items (``user_ids``, ``item_ids``) at inference: no dropout; Gumbel noise
        only if eval_gumbel_noise."""
        e = inference(self)
        n_users = len(self.user_ids)
        return e[:n_users], e[n_users:]

    def dense_parameters(self) -> dict[str, nn.Parameter]:
        """The replicated parameters W_m (``proj.m``) and V_m (``hyper.m``), by name."""
        return {k: v for k, v in self.named_parameters() if k.startswith(("proj.", "hyper."))}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
