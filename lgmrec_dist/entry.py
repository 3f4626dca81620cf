"""The command line's one error path, and a module's own entry point through its ``lgmrec`` subcommand.

A leaf module (the standard library and ``lgmrec_dist.errors`` only): the subcommand modules import it,
and ``lgmrec_dist.cli`` imports them, so keeping it out of ``cli`` keeps the import graph free of cycles.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from lgmrec_dist.errors import UserError

# OSErrors that describe the machine, not a bug (a full disk, a missing or forbidden path): the user
# can act on them, so they get one line instead of a traceback
USER_OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS,
                  errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EMFILE}


def describe_os_error(exc: OSError) -> str:
    """``PATH: No space left on device`` (pyarrow's OSErrors carry the errno but no file name)."""
    reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    where = ": ".join(os.fsdecode(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"{where}: {reason}" if where else reason


def guarded(func, args) -> int:
    """Run a subcommand; an expected failure becomes one ``error:`` line on stderr and exit status 2."""
    try:
        return func(args)
    except UserError as exc:
        message = str(exc)
    except OSError as exc:
        if exc.errno not in USER_OS_ERRNOS:
            raise
        message = describe_os_error(exc)
    print(f"error: {message}", file=sys.stderr)
    return 2


def run_subcommand(register_cli, name: str, argv=None) -> int:
    """``python -m MODULE ARGS`` as ``lgmrec NAME ARGS``: a module's entry point through its own subcommand."""
    parser = argparse.ArgumentParser(prog="lgmrec")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    return guarded(args.func, args)
