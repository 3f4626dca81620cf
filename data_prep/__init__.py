"""Ray batch jobs and dataset builders: MMRec import/export, synthetic catalogues."""
from lgmrec_dist import _dgl_shim  # noqa: F401
