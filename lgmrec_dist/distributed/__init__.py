"""The exact distributed path (issue 5): process groups, row ownership, halo exchange, sharded LGMRec."""
