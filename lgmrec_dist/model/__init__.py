"""LGMRec model (docs/model.md): CGE, MGE, the global hypergraph, losses, and their fusion."""
from lgmrec_dist.model.lgmrec import TAU, LGMRec
from lgmrec_dist.model.params import ModelParams, model_params

__all__ = ["LGMRec", "ModelParams", "TAU", "model_params"]
