"""Distributed pieces: process groups, row ownership and exchange, the sharded exact LGMRec, the
row-sharded feature tables of the sampled mode, and every global reduction (``reduce``)."""
import warnings

# torch 2.13 marks the autograd-aware collectives of torch.distributed.nn.functional deprecated in favour
# of a private API (torch.distributed._functional_collectives); they still work and are what we need.
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.\w+ is deprecated")
