"""The base class of the project's expected failures.

A :class:`UserError` is a refusal whose message already names the file, key, column or row at fault;
the command line's one error path (``lgmrec_dist.entry.guarded``) prints it as a single ``error:`` line
(docs/failures.md). A leaf module, so every layer can raise it without importing the command line.
"""
from __future__ import annotations


class UserError(Exception):
    """An expected failure (bad input, a bad value, a refused command): one error line, no traceback."""
