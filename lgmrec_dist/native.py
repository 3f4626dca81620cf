"""Small C kernels compiled at first use with the system C compiler and loaded with ctypes.

No torch headers are involved (a plain C file compiles in about a second, where a torch C++ extension
takes a minute), and the library links the OpenMP runtime torch has already loaded, so its parallel
regions share torch's thread pool instead of competing with it. The library is cached under
``$LGMREC_KERNEL_CACHE`` (default ``$XDG_CACHE_HOME/lgmrec_dist`` or ``~/.cache/lgmrec_dist``), keyed by
the source (with the headers next to it that it includes with quotes), the flags, the compiler's version
and the CPU's feature flags, so a cache shared between machines never hands one CPU code built for another.
The compiler is ``$CC`` (default ``cc``).

Where no compiler runs (or the build fails), :func:`load` returns None and the caller falls back to its
pure-torch form; the reason is logged once.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger("lgmrec")

FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared"]
# flags a compiler may not know (another architecture, another compiler), dropped one at a time on failure
OPTIONAL_FLAGS = ["-mprefer-vector-width=512", "-march=native"]
_loaded: dict[tuple, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    if os.environ.get("LGMREC_KERNEL_CACHE"):
        return Path(os.environ["LGMREC_KERNEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lgmrec_dist"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _source_text(source: Path) -> bytes:
    """The source's bytes followed by those of the local headers it includes (``#include "name.h"``)."""
    text = source.read_bytes()
    headers = re.findall(rb'^\s*#\s*include\s+"([^"]+)"', text, flags=re.M)
    return b"\0".join([text] + [(source.parent / h.decode()).read_bytes() for h in headers])


def _compile(cc: str, source: Path, flags: list[str], out: Path) -> None:
    """Build into a temporary file, then rename: concurrent processes never load a half-written library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True, text=True,
                             timeout=120)
        if res.returncode:
            raise RuntimeError(res.stderr.strip()[-2000:] or f"{cc} exited with {res.returncode}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


PTR, I64, I32, F32, U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint32


def load(source: Path, signatures: dict | None = None) -> ctypes.CDLL | None:
    """The compiled library of the C file ``source``, or None where it cannot be built here.

    ``signatures`` ({function: (argtypes or None, restype)}) are declared on the library the first time a
    caller passes them, so each kernel module states its C functions' types once, next to its wrapper."""
    lib = _library(source)
    if lib is not None and signatures and not getattr(lib, "_declared", False):
        for name, (argtypes, restype) in signatures.items():
            fn = getattr(lib, name)
            if argtypes is not None:
                fn.argtypes = argtypes
            fn.restype = restype
        lib._declared = True
    return lib


def _library(source: Path) -> ctypes.CDLL | None:
    cc = os.environ.get("CC", "cc")
    key = (str(source), cc, str(cache_dir()))
    if key in _loaded:
        return _loaded[key]
    lib = None
    try:
        exe = shutil.which(cc)
        if exe is None:
            raise RuntimeError(f"no C compiler {cc!r} on PATH (set CC)")
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
        text = _source_text(source)
        digest = hashlib.sha256(b"\0".join([text, " ".join(FLAGS).encode(), version.encode(),
                                            _cpu_flags().encode()])).hexdigest()[:16]
        out = cache_dir() / f"{source.stem}-{digest}.so"
        if not out.exists():
            t0 = time.perf_counter()
            flags = list(FLAGS)
            while True:
                try:
                    _compile(exe, source, flags, out)
                    break
                except RuntimeError:
                    optional = [f for f in OPTIONAL_FLAGS if f in flags]
                    if not optional:
                        raise
                    flags.remove(optional[0])
            log.info("compiled %s in %.1f s (%s)", source.name, time.perf_counter() - t0, out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("native kernel %s unavailable, using the pure-torch form: %s", source.name, e)
    _loaded[key] = lib
    return lib
