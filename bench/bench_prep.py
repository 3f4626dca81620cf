"""Benchmark: ``lgmrec prep`` throughput (input rows/s) and peak memory on synthetic raw catalogues.

    .venv/bin/python bench/bench_prep.py                       # 1M and 10M interactions
    .venv/bin/python bench/bench_prep.py --scales 1 --modalities text:64

Scale s (millions of interactions) uses 50,000·s users and 20,000·s items; the raw catalogue
(``data_prep.synth_parquet``: string ids, 0.1 % exact duplicates, 0.05 % null user ids, 0.2 % items
without vectors) is generated once under ``--out`` and reused. Each scale runs in its own process:

1. ``synth``  -- time and peak memory of generating the raw catalogue (only when not cached);
2. ``ray.init`` on a fresh local cluster (timed separately: "Ray start-up");
3. ``cold``   -- prep (P = 1) as the first Ray Data job of the session (Ray workers are spawned on demand);
4. ``warm``   -- the same prep again in the same session (``overwrite``);
5. ``random4`` -- prep with ``--partitions 4`` (random): the partitioned layout, ``part-k/`` per part;
6. ``metis4`` -- prep with ``--partitions 4`` (METIS, which gathers the training graph in the driver).

``--runs`` picks and orders them (default all four). The raw catalogue is generated in a process of
its own, so the prep process' figures are prep's.

Throughput = input log rows / prep wall time (Ray start-up excluded). Memory: peak proportional set size
(PSS, shared pages split between processes, so the Ray object store is not double counted) summed over
the benchmark process and all its descendants (Ray's GCS, raylet and workers), sampled once a second
(reading smaps_rollup of ~10 processes costs ~50 ms of kernel time, so denser sampling would slow the
job it measures); plus the driver's own peak RSS during each prep (this process alone, sampled every
0.1 s: the figure that must stay flat as the data grows).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class TreeMemory:
    """Peak PSS of this process and all its descendants, and peak RSS of this process alone (the prep
    driver), sampled in a thread (the driver every ``driver_interval`` s, the tree every ``interval`` s)."""

    def __init__(self, interval: float = 1.0, driver_interval: float = 0.1):
        import psutil
        self.psutil, self.interval, self.driver_interval = psutil, interval, driver_interval
        self.peak = 0
        self.driver_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _pss(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def sample(self) -> int:
        me = self.psutil.Process()
        pids = [me.pid] + [c.pid for c in me.children(recursive=True)]
        return sum(self._pss(p) for p in pids)

    def _driver_rss(self) -> int:
        return self.psutil.Process().memory_info().rss

    def _run(self):
        next_tree = 0.0
        while not self._stop.is_set():
            now = time.perf_counter()
            if now >= next_tree:
                self.peak = max(self.peak, self.sample())
                next_tree = now + self.interval
            self.driver_peak = max(self.driver_peak, self._driver_rss())
            self._stop.wait(self.driver_interval)

    def cpu(self) -> tuple[float, float]:
        """(CPU seconds of this process, CPU seconds of its live descendants), user + system."""
        me = self.psutil.Process()
        own = sum(me.cpu_times()[:2])
        kids = 0.0
        for c in me.children(recursive=True):
            try:
                kids += sum(c.cpu_times()[:2])
            except self.psutil.Error:
                pass
        return own, kids

    def __enter__(self):
        self.cpu0 = self.cpu()
        self.peak = self.sample()
        self.driver_peak = self._driver_rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())
        self.driver_peak = max(self.driver_peak, self._driver_rss())
        own, kids = self.cpu()
        self.driver_cpu, self.workers_cpu = own - self.cpu0[0], kids - self.cpu0[1]


def gib(n: float) -> float:
    return round(n / 2**30, 2)


def raw_catalogue(scale: int, modalities: dict, out_root: Path) -> tuple[Path, dict]:
    from data_prep.synth_parquet import make_parquet_synthetic
    tag = "_".join(f"{k}{v}" for k, v in modalities.items())
    path = out_root / f"raw_{scale}m_{tag}"
    info_path = path / "synth.json"
    timing = {}
    if not info_path.exists():
        with TreeMemory() as mem:
            t0 = time.perf_counter()
            make_parquet_synthetic(path, 50_000 * scale, 20_000 * scale, 1_000_000 * scale, modalities, seed=scale,
                                   duplicate_rate=0.001, null_rate=0.0005, missing_feature_rate=0.002,
                                   overwrite=True)
            timing = {"synth_seconds": round(time.perf_counter() - t0, 1), "synth_peak_pss_gb": gib(mem.peak)}
    return path, {**json.loads(info_path.read_text()), **timing}


RUNS = {"cold": {}, "warm": {}, "random4": {"partitions": 4, "partition_method": "random"},
        "metis4": {"partitions": 4, "partition_method": "metis"}}


def run_one(scale: int, modalities: dict, out_root: Path, runs: list[str]) -> dict:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    import ray

    from data_prep.prep import prep

    raw, info = raw_catalogue(scale, modalities, out_root)
    feats = {m: raw / "features" / f"{m}.parquet" for m in modalities}
    res = {"scale_m": scale, "log_rows": info["log_rows"], "users": info["num_users"], "items": info["num_items"],
           "modalities": modalities, **{k: v for k, v in info.items() if k.startswith("synth_")}}
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    res["ray_start_seconds"] = round(time.perf_counter() - t0, 2)
    out = out_root / f"prepared_{scale}m"
    res["driver_rss_before_gb"] = gib(TreeMemory()._driver_rss())
    for label in runs:
        kw = RUNS[label]
        with TreeMemory() as mem:
            t0 = time.perf_counter()
            m = prep(raw / "interactions", feats, out, overwrite=True, progress=(label == runs[0]), **kw)
            sec = time.perf_counter() - t0
        res[label] = {"seconds": round(sec, 2), "rows_per_s": round(info["log_rows"] / sec),
                      "peak_pss_gb": gib(mem.peak), "driver_peak_rss_gb": gib(mem.driver_peak),
                      "load_1min_after": round(os.getloadavg()[0], 2),
                      "driver_cpu_s": round(mem.driver_cpu, 2), "ray_cpu_s": round(mem.workers_cpu, 2)}
        print(f"[bench] {scale}M {label}: {sec:.1f}s, {info['log_rows'] / sec:,.0f} rows/s, "
              f"peak PSS {gib(mem.peak)} GiB, driver peak RSS {gib(mem.driver_peak)} GiB, CPU s driver {mem.driver_cpu:.1f} / Ray processes "
              f"{mem.workers_cpu:.1f}, 1-min load average after {os.getloadavg()[0]:.2f}", flush=True)
    res["num_interactions"], res["num_users_out"], res["num_items_out"] = (
        m["num_interactions"], m["num_users"], m["num_items"])
    res["dropped"] = m["dropped"]
    res["driver_lifetime_max_rss_gb"] = gib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    ray.shutdown()
    return res


def _child(flags: list[str], args):
    proc = subprocess.run([sys.executable, __file__, *flags, "--modalities", args.modalities, "--out", args.out],
                          capture_output=True, text=True)
    sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith("RESULT ")))
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not line:
        sys.stderr.write(proc.stderr[-3000:])
        return None
    return json.loads(line[0][7:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", default="1,10", help="millions of interactions, comma-separated (default 1,10)")
    p.add_argument("--modalities", default="text:384,image:512")
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "prep"))
    p.add_argument("--runs", default="cold,warm,random4,metis4",
                   help=f"prep runs per scale, in order, from {', '.join(RUNS)} (default all)")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--synth-only", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from data_prep.synth_parquet import parse_modalities
    modalities = parse_modalities(args.modalities)
    out_root = Path(args.out)
    out_root.mkdir(parents=True, exist_ok=True)
    runs = [r for r in args.runs.split(",") if r]
    if args.synth_only is not None:          # its own process: the prep process' peak is prep's alone
        print("RESULT " + json.dumps(raw_catalogue(args.synth_only, modalities, out_root)[1]), flush=True)
        return 0
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, modalities, out_root, runs)), flush=True)
        return 0
    load = os.getloadavg()
    print(f"[bench] load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    results = []
    for s in (int(x) for x in args.scales.split(",")):
        synth = _child(["--synth-only", str(s)], args)
        one = _child(["--one", str(s), "--runs", ",".join(runs)], args)
        if synth is None or one is None:
            return 1
        results.append({**one, **{k: v for k, v in synth.items() if k.startswith("synth_")}})
    print(json.dumps(results, indent=1))
    print(f"\n| interactions | users / items | synth | Ray start-up | "
          + " | ".join(f"prep {r}: time (rows/s), driver peak RSS, tree PSS, load" for r in runs) + " |")
    print("| --- | --- | --- | --- |" + " --- |" * len(runs))
    for r in results:
        synth = f"{r['synth_seconds']} s, {r['synth_peak_pss_gb']} GiB" if "synth_seconds" in r else "cached"
        cells = [f"{r[k]['seconds']} s ({r[k]['rows_per_s'] / 1e6:.2f} M/s), {r[k]['driver_peak_rss_gb']} GiB, "
                 f"{r[k]['peak_pss_gb']} GiB, {r[k]['load_1min_after']}" for k in runs]
        print(f"| {r['log_rows']:,} | {r['users']:,} / {r['items']:,} | {synth} | {r['ray_start_seconds']} s | "
              + " | ".join(cells) + " |")
    load = os.getloadavg()
    print(f"[bench] load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
