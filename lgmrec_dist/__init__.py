"""lgmrec_dist: distributed training of LGMRec (see docs/, the model in docs/model.md)."""
from lgmrec_dist import _dgl_shim  # noqa: F401  (before anything imports dgl)

__version__ = "0.1.0"
