"""Counter-based random numbers keyed by (seed, step, stream, node id).

Gumbel noise and dropout masks of the hypergraph (docs/model.md §1.6) are drawn from a hash of their
key instead of a sequential generator, so a node's draw does not depend on which process computes it
or on how many processes there are: P ranks and 1 rank see the same noise (docs/model.md §7.3).
The hash is Chris Wellons' ``lowbias32`` applied in 32-bit lanes held in int64 tensors; on CPU the same
hash runs in one pass in ``rng.c`` (compiled at first use, ``lgmrec_dist.native``; the same bits).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lgmrec_dist import native

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, step: int, stream: int) -> int:
    return _mix32_int(seed ^ _mix32_int(step ^ _mix32_int(stream * 0x9E3779B9)))


def _kernel():
    return native.load(Path(__file__).with_name("rng.c"),
                       {"keyed_uniform": ([native.U32, native.PTR, native.I64, native.I64, native.PTR, native.I32],
                                          None)})


def keyed_uniform(key: int, ids: torch.Tensor, width: int, fused: bool = True) -> torch.Tensor:
    """Uniform floats in (0, 1), shape (len(ids), width); entry (r, c) depends only on (key, ids[r], c).
    ``fused``: use the one-pass kernel where it is available (CPU); False: the torch form."""
    lib = _kernel() if fused and ids.device.type == "cpu" else None
    if lib is not None:
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty(len(ids), width, dtype=torch.float32)
        lib.keyed_uniform(key & _M32, ids.data_ptr(), len(ids), width, out.data_ptr(), torch.get_num_threads())
        return out
    counter = ids.to(torch.int64).unsqueeze(1) * width + torch.arange(width, device=ids.device)
    h = _mix32((counter & _M32) ^ key)
    return to_unit(_mix32(h ^ (counter >> 32) ^ 0x5BD1E995))


def to_unit(h: torch.Tensor) -> torch.Tensor:
    """32-bit hashes -> float32 in (0, 1). 23 bits: (2^23 - 0.5) / 2^23 is still exact in float32, so
    u < 1 strictly and -log(-log u) stays finite (24 bits would round the top value up to 1.0)."""
    return ((h >> 9).to(torch.float32) + 0.5) * (1.0 / (1 << 23))


def keyed_gumbel(key: int, ids: torch.Tensor, width: int) -> torch.Tensor:
    """Standard Gumbel noise -log(-log u) keyed like :func:`keyed_uniform`."""
    return -torch.log(-torch.log(keyed_uniform(key, ids, width)))


# numpy forms of the same hash, for draws keyed by large integer ids outside torch (training triples,
# evaluation samples): uint64 arrays holding 32-bit lanes
_M32_NP = np.uint64(_M32)


def mix32_np(x: np.ndarray) -> np.ndarray:
    """:func:`_mix32` (lowbias32) on uint64 arrays of 32-bit values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32_NP
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32_NP
    return x ^ (x >> np.uint64(16))


def keyed_hash64(key: int, ids: np.ndarray, attempt: int = 0) -> np.ndarray:
    """A 64-bit hash (uint64) of each id under ``key``; ``attempt`` gives independent re-draws."""
    p = np.asarray(ids, dtype=np.uint64)
    lo = mix32_np((p & _M32_NP) ^ np.uint64(stream_key(key, attempt, 0)))
    hi = mix32_np((p >> np.uint64(32)) ^ lo ^ np.uint64(stream_key(key, attempt, 1)))
    return (hi << np.uint64(32)) | mix32_np(lo ^ hi)
