"""A module's own entry point through its ``lgmrec`` subcommand.

A leaf module (standard library only): the subcommand modules import it, and ``lgmrec_dist.cli`` imports
them, so keeping it out of ``cli`` keeps the import graph free of cycles.
"""
from __future__ import annotations

import argparse
import sys


def run_subcommand(register_cli, name: str, argv=None) -> int:
    """``python -m MODULE ARGS`` as ``lgmrec NAME ARGS``: a module's entry point through its own subcommand."""
    parser = argparse.ArgumentParser(prog="lgmrec")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)
