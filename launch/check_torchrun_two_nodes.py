"""Launch check: training on a partitioned dataset by two torchrun agents on this machine, as on two nodes
(docs/cluster.md, "Two torchrun agents").

    .venv/bin/python launch/check_torchrun_two_nodes.py --data DIR --out RUNDIR [--isolate]
        [--config configs/demo.yaml] [--set key=value ...]
    .venv/bin/python launch/check_torchrun_two_nodes.py --node-data DIR0 --node-data DIR1 --out RUNDIR ...

``DIR`` is a dataset prepared with ``lgmrec prep --partitions 2``. Two agents are started
(``torchrun --nnodes 2 --nproc_per_node 1``, c10d rendezvous on 127.0.0.1), the first with local address
127.0.0.1 and the second with 127.0.0.2, so that c10d, which orders the agents by address, gives the
first agent rank 0. Each agent's rank runs ``lgmrec train --data <its node's copy>``. With ``--isolate``
each node's copy (in a temporary directory) holds only the global metadata (manifest, partition book, id
maps) and that node's ``part-k/``: no whole interaction table, no whole feature matrix and no other part,
so a rank that reached for them would fail. ``--node-data`` gives the two nodes' directories directly.

Exit status 0 when both agents finish and RUNDIR/metrics.json says world_size 2; the agents' output is
printed either way.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_FILES = ("manifest.json", "partitions", "user_map.parquet", "item_map.parquet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_copies(data: Path, root: Path, parts: int = 2) -> list[Path]:
    """One directory per node under ``root``: the global metadata and only that node's part (hard links
    where the filesystem allows, else copies)."""
    out = []
    for k in range(parts):
        node = root / f"node-{k}" / data.name
        node.mkdir(parents=True)
        for rel in (*GLOBAL_FILES, f"part-{k}"):
            src = data / rel
            if src.is_dir():
                shutil.copytree(src, node / rel, copy_function=_link_or_copy)
            elif src.exists():
                _link_or_copy(src, node / rel)
        out.append(node)
    return out


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def run_two_agents(node_data: list[Path], out: Path, train_args: list[str], timeout: float = 600,
                   module: tuple = ("lgmrec_dist.train",)) -> list:
    """Start both agents running ``python -m MODULE --data NODE_DATA --out OUT TRAIN_ARGS`` (``module``:
    the module and any subcommand, e.g. ("lgmrec_dist", "export")); returns [(returncode, output)] per agent."""
    port, rdzv_id = _free_port(), f"lgmrec-check-{os.getpid()}"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    procs = []
    for k, data in enumerate(node_data):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
               "--local-addr", f"127.0.0.{k + 1}", "-m", *module, "--data", str(data),
               "--out", str(out), *train_args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for p in procs:
        try:
            output, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            output, _ = p.communicate()
            output += f"\n(agent killed after {timeout:.0f} s)"
        results.append((p.returncode, output))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="dataset prepared with --partitions 2 (both nodes read it)")
    ap.add_argument("--node-data", type=Path, action="append", help="node k's dataset directory (give two)")
    ap.add_argument("--isolate", action="store_true", help="give each node a copy holding only its partition")
    ap.add_argument("--out", type=Path, required=True, help="run directory (shared by both nodes)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    if (args.data is None) == (args.node_data is None) or (args.node_data and len(args.node_data) != 2):
        ap.error("give --data DIR, or --node-data twice")
    train_args = ["--config", args.config, *(a for kv in args.set for a in ("--set", kv))]
    with tempfile.TemporaryDirectory(prefix="lgmrec-two-nodes-") as tmp:
        if args.node_data:
            nodes = args.node_data
        elif args.isolate:
            nodes = isolated_copies(args.data.resolve(), Path(tmp))
        else:
            nodes = [args.data, args.data]
        results = run_two_agents(nodes, args.out, train_args, args.timeout)
    for k, (rc, output) in enumerate(results):
        print(f"--- agent {k} (rank {k}, data {nodes[k]}): exit {rc}\n{output[-6000:]}")
    metrics = args.out / "metrics.json"
    ok = all(rc == 0 for rc, _ in results) and metrics.is_file() and json.loads(metrics.read_text())["world_size"] == 2
    print("two-node torchrun check:", "passed" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
