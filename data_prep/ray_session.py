"""The Ray session of the data jobs (``lgmrec prep``, ``lgmrec extract``), and errors out of Ray tasks.

:func:`ray_session` reuses an initialised Ray, joins ``address`` / ``$RAY_ADDRESS``, or starts a private
local cluster that it shuts down again at the end. :func:`ray_data_settings` sets Ray Data's context for
one job and restores it afterwards. :func:`fail_in_task` / :func:`ray_errors` carry a task's own
:class:`~lgmrec_dist.dataset.DatasetError` message through Ray's exception wrappers back to the driver.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re

from lgmrec_dist.dataset import DatasetError

_ERR_START, _ERR_END = "<<prep-error>>", "<</prep-error>>"


@contextlib.contextmanager
def ray_session(address: str | None = None, *, verbose: bool = False, say=None):
    """Yield the ``ray`` module with a session up; ``say(stage, message)`` hears how it was found.

    ``verbose`` forwards the workers' log lines to this process.
    """
    import ray

    started = False
    if ray.is_initialized():
        how = "using the running Ray session"
    else:
        kwargs = {"include_dashboard": False, "log_to_driver": verbose, "logging_level": logging.WARNING}
        address = address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address:
                ray.init(address=address, **kwargs)
                how = f"joined the Ray cluster at {address}"
            else:
                os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster
                ray.init(**kwargs)
                how = "started a local Ray cluster"
        except Exception as exc:  # noqa: BLE001 -- ConnectionError, RuntimeError, ValueError ...
            where = f"at {address}" if address else "locally"
            raise DatasetError(f"cannot start or join a Ray cluster {where}: {exc}") from None
        started = True
    try:
        if say:
            say("ray", f"{how} ({int(ray.cluster_resources().get('CPU', 0))} CPUs)")
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def ray_data_settings(*, verbose: bool = False, preserve_order: bool | None = None,
                      log_level: int = logging.ERROR):
    """Ray Data without progress bars and with its logger at ``log_level`` (unless ``verbose``), and
    ``preserve_order`` when given; the previous settings come back at the end."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = (ctx.enable_progress_bars, ctx.execution_options.preserve_order, logger.level)
    if not verbose:
        ctx.enable_progress_bars = False
        logger.setLevel(log_level)
    if preserve_order is not None:
        ctx.execution_options.preserve_order = preserve_order
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved[:2]
        logger.setLevel(saved[2])


def fail_in_task(message: str):
    """Raise inside a Ray task so that the driver can recover the exact message (see :func:`ray_errors`)."""
    raise DatasetError(f"{_ERR_START}{message}{_ERR_END}")


@contextlib.contextmanager
def ray_errors(what: str):
    """Turn a failure inside Ray Data back into a DatasetError with the task's own message."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 -- Ray wraps task errors in its own exception types
        text = str(exc)
        m = re.search(re.escape(_ERR_START) + r"(.*?)" + re.escape(_ERR_END), text, re.S)
        if m:
            raise DatasetError(m.group(1)) from None
        last = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise DatasetError(f"{what}: {type(exc).__name__}: {last[-1] if last else exc}") from None


@contextlib.contextmanager
def task_os_errors():
    """A Ray task's OSError (a full disk or a refused write on a worker) raised again here as a plain OSError
    with its errno, so the command line reports it as one error line (docs/failures.md)."""
    import ray
    try:
        yield
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, OSError) and cause.errno:
            raise OSError(cause.errno, os.strerror(cause.errno), cause.filename) from None
        raise
