"""lgmrec_dist: distributed training of LGMRec (see ../shared/LGMRec_SPEC.md and docs/)."""
from lgmrec_dist import _dgl_shim  # noqa: F401  (before anything imports dgl)

__version__ = "0.1.0"
