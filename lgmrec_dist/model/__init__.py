"""LGMRec model (LGMRec_SPEC.md §1): CGE, MGE, the global hypergraph, losses, and their fusion."""
from lgmrec_dist.model.lgmrec import LGMRec, TAU

__all__ = ["LGMRec", "TAU"]
