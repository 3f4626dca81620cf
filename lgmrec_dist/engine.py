"""The interface of a training engine: what the training loop (``train.py``) drives, whatever the mode.

An engine owns a model, its optimizers and its share of the data for one process; ``engines.build_engine``
picks the engine of a run (docs/distributed.md, "Engines"). Every engine follows the same protocol:

* ``train()`` before an epoch's steps; ``step(users, pos, neg, step)`` for one global batch of triples,
  returning the *global* loss terms (``loss``, ``bpr``, ``hcl``, ``reg``) as floats, identical on every rank;
* ``embeddings()`` then ``evaluate(evaluator, emb)`` for the MMRec metrics of a split (global metrics);
* ``state_dict()`` / ``load_state_dict()`` for this process' share of a checkpoint;
* ``model_payload()`` for this process' rows of the trained parameters (the ``best/`` model, export);
* ``num_parameters()`` (global), and ``close()`` to release worker processes.
"""
from __future__ import annotations

import abc

import torch

from lgmrec_dist.distributed.payload import model_payload
from lgmrec_dist.distributed.reduce import global_terms


class Engine(abc.ABC):
    """One process' training engine (see the module docstring for the protocol)."""

    @abc.abstractmethod
    def train(self) -> None: ...

    @abc.abstractmethod
    def step(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, step: int) -> dict[str, float]: ...

    @abc.abstractmethod
    def embeddings(self): ...

    @abc.abstractmethod
    def evaluate(self, evaluator, emb) -> dict: ...

    @abc.abstractmethod
    def state_dict(self) -> dict: ...

    @abc.abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @abc.abstractmethod
    def model_payload(self) -> dict: ...

    @abc.abstractmethod
    def num_parameters(self) -> int: ...

    def close(self) -> None:
        """Release what the engine started (sampler workers); a no-op by default."""


class EngineState(Engine):
    """Checkpoint state shared by the engines: the parameters of ``module`` (with its ``eval_calls``, the
    count of inference passes that keys the evaluation noise), every optimizer in ``optimizers``, and what
    an engine adds in :meth:`extra_state`. Also the exact modes' step: ``model.batch_loss`` (this process'
    share of the global loss), backward (DDP's ``dense`` wrapper sums the replicated W_m, V_m gradients over
    ranks meanwhile), and the optimizers."""

    module: torch.nn.Module
    optimizers: list
    dense: torch.nn.Module | None = None   # DDP over W_m, V_m on P ranks (``reduce.replicate_dense``)

    def start_dense_reduction(self) -> None:
        """Call DDP's wrapper once before the step's loss, so that backward sums the dense gradients."""
        if self.dense is not None:
            self.dense()        # the model reads W_m, V_m itself; the call arms DDP's reducer

    def step(self, users, pos, neg, step: int) -> dict:
        self.start_dense_reduction()
        terms = self.model.batch_loss(users, pos, neg, step)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        for opt in self.optimizers:
            opt.step()
        return global_terms(terms)

    def close(self) -> None:
        self.dense = None       # DDP's reducer, released while the process group lives (group.close_process_group)

    def model_payload(self) -> dict:
        """The rows the model holds (every row in one process, a rank's own when sharded) and W_m, V_m."""
        m = self.model
        return model_payload(m.user_ids, m.user_embedding, m.item_ids, m.item_embedding, m.dense_parameters())

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers],
                "eval_calls": self.module.eval_calls, **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        # checkpoints of the exact mode on P ranks written before it shared the one model keep W_m, V_m
        # under "dense."
        self.module.load_state_dict({k.removeprefix("dense."): v for k, v in state["model"].items()})
        # checkpoints written before the engines shared this class hold one "optimizer" (exact modes)
        saved = state["optimizers"] if "optimizers" in state else [state["optimizer"]]
        for opt, s in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(s)
        self.module.eval_calls = state["eval_calls"]
        self.load_extra_state(state)
