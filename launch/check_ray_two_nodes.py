"""Launch check: ``lgmrec prep`` on a two-node Ray cluster started on this machine (docs/cluster.md).

    .venv/bin/python launch/check_ray_two_nodes.py [--rows 20000] [--partitions 2] [--keep DIR]

1. ``ray start --head --num-cpus 1`` and ``ray start --address HEAD --num-cpus 1`` (a second raylet, its
   own temporary directory), both with a private ``--temp-dir``;
2. a small raw catalogue (``data_prep.synth_parquet``, many files so that there are many blocks);
3. ``prep(..., ray_address=HEAD, partitions=P)`` in this process, which joins the cluster as a driver;
4. checks: the cluster has two alive nodes, prep's tasks ran on both (``manifest.prep.ray_nodes == 2``,
   counted from ``ray.get_runtime_context().get_node_id()`` inside the tasks), every part opens;
5. the two nodes' processes are stopped by process id (also on failure): those whose command line names
   this check's private Ray temporary directory. Not ``ray stop``, which would stop every Ray process on
   the machine, other users' clusters included.

Exit status 0 when every check passes; it prints what it saw either way.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict) -> None:
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run([ray_bin, *args], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: ray {' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def _cluster_pids(ray_tmp: str) -> list[int]:
    """Processes of this cluster only: their command line names its private temporary directory."""
    import psutil
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.info["pid"] != me and any(ray_tmp in a for a in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except psutil.Error:
            pass
    return found


def _stop_cluster(ray_tmp: str) -> int:
    import psutil
    pids = _cluster_pids(ray_tmp)
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs += [p, *p.children(recursive=True)]
        except psutil.Error:
            pass
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    return len(procs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=20000, help="interactions of the raw catalogue (default 20000)")
    p.add_argument("--partitions", type=int, default=2)
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    args = p.parse_args(argv)
    work = Path(args.keep or tempfile.mkdtemp(prefix="lgmrec-2node-"))
    work.mkdir(parents=True, exist_ok=True)
    # short socket paths: Ray's session directory holds Unix sockets (108-byte limit)
    ray_tmp = tempfile.mkdtemp(prefix="r2n-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    t0 = time.perf_counter()
    ok = False
    try:
        _ray(["start", "--head", "--num-cpus", "1", "--port", str(port), "--temp-dir", ray_tmp,
              "--include-dashboard=false", "--disable-usage-stats"], env)
        _ray(["start", "--address", address, "--num-cpus", "1", "--temp-dir", ray_tmp, "--disable-usage-stats"], env)
        print(f"[2node] cluster at {address} up in {time.perf_counter() - t0:.1f}s", flush=True)

        import ray

        from data_prep.prep import prep
        from data_prep.synth_parquet import make_parquet_synthetic
        from lgmrec_dist.dataset_parts import open_partition

        raw = work / "raw"
        make_parquet_synthetic(raw, max(200, args.rows // 20), max(100, args.rows // 50), args.rows,
                               {"image": 8, "text": 4}, seed=1, rows_per_file=max(500, args.rows // 8),
                               overwrite=True)
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        alive = [n for n in ray.nodes() if n["Alive"]]
        print(f"[2node] {len(alive)} alive node(s), {int(ray.cluster_resources().get('CPU', 0))} CPUs", flush=True)
        t1 = time.perf_counter()
        m = prep(raw / "interactions", {m: raw / "features" / f"{m}.parquet" for m in ("image", "text")},
                 work / "prepared", kcore=2, partitions=args.partitions, partition_method="random",
                 overwrite=True, progress=False, ray_address=address)
        print(f"[2node] prep: {m['num_interactions']:,} interactions in {time.perf_counter() - t1:.1f}s; "
              f"tasks ran on {m['prep']['ray_nodes']} node(s)", flush=True)
        parts = [open_partition(work / "prepared", k, args.partitions) for k in range(args.partitions)]
        checks = {"two alive nodes": len(alive) == 2, "tasks on both nodes": m["prep"]["ray_nodes"] == 2,
                  "every part opens": len(parts) == args.partitions}
        for name, passed in checks.items():
            print(f"[2node] {'ok  ' if passed else 'FAIL'} {name}", flush=True)
        ok = all(checks.values())
        ray.shutdown()
    finally:
        stopped = _stop_cluster(ray_tmp)
        print(f"[2node] stopped {stopped} Ray process(es) of this cluster; {time.perf_counter() - t0:.1f}s in all",
              flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
