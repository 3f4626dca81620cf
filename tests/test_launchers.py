"""Cluster launchers: the torchrun multi-node script, the Slurm template (run for real through
stand-ins for srun/scontrol: one node, two ranks), `ray job submit`, the KubeRay RayJob manifest, and the
Ray Train entry point, which must reach the same metrics as torchrun with the same number of ranks."""
import json
import os
import re
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SETS = {"epochs": 3, "embedding_size": 16, "train_batch_size": 256, "learning_rate": 0.005, "num_threads": 1,
        "deterministic": True, "checkpoint_every_epoch": False, "seed": 5}


def sh(script, *args, env=None, timeout=60):
    return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", ["torchrun_multinode.sh", "slurm.sbatch", "ray_train.sh"])
def test_scripts_parse(script):
    res = subprocess.run(["bash", "-n", str(LAUNCH / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_sbatch_directives():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
    assert set(directives) >= {"job-name", "nodes", "ntasks-per-node", "gpus-per-node", "time"}
    assert directives["ntasks-per-node"] == "1"  # one torchrun per node; torchrun starts the ranks
    # sbatch stops reading directives at the first command: every #SBATCH line precedes it
    first_cmd = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_cmd for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert re.search(r"^srun .*--ntasks-per-node=1", text, re.M) and "torchrun_multinode.sh" in text


def test_torchrun_multinode_command_from_environment():
    res = sh("torchrun_multinode.sh", "--data", "/d", "--out", "/o",
             env={"NNODES": "4", "NODE_RANK": "3", "NPROC_PER_NODE": "8", "MASTER_ADDR": "node0", "MASTER_PORT": "29555",
                  "RDZV_ID": "job7", "DRY_RUN": "1", "PYTHON": "python3"})
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout)
    assert cmd[:3] == ["python3", "-m", "torch.distributed.run"]
    opts = dict(zip(cmd[3:15:2], cmd[4:15:2]))
    assert opts == {"--nnodes": "4", "--node_rank": "3", "--nproc_per_node": "8", "--rdzv_backend": "c10d",
                    "--rdzv_endpoint": "node0:29555", "--rdzv_id": "job7"}
    assert cmd[15:] == ["-m", "lgmrec_dist.train", "--data", "/d", "--out", "/o"]
    # under srun: Slurm's variables
    slurm = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "99",
             "MASTER_ADDR": "n0", "DRY_RUN": "1"}
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "NPROC_PER_NODE", "RDZV_ID")}
    res = subprocess.run(["bash", str(LAUNCH / "torchrun_multinode.sh")], capture_output=True, text=True,
                         env={**env, **slurm})
    assert "--nnodes 2 --node_rank 1 --nproc_per_node 4" in res.stdout and "--rdzv_id 99" in res.stdout
    # several nodes need the rendezvous host; a node rank must be below the node count
    bad = sh("torchrun_multinode.sh", env={"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "", "DRY_RUN": "1"})
    assert bad.returncode == 2 and "MASTER_ADDR" in bad.stderr
    bad = sh("torchrun_multinode.sh", env={"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "n0", "DRY_RUN": "1"})
    assert bad.returncode == 2 and "NODE_RANK" in bad.stderr


def test_ray_job_submit_command():
    res = sh("ray_train.sh", "--data", "/shared/p", "--out", "/shared/r", "--num-workers", "8", "--use-gpu",
             env={"RAY_ADDRESS": "http://head:8265", "DRY_RUN": "1", "PYTHON": "python3"})
    assert res.returncode == 0, res.stderr
    cmd = shlex.split(res.stdout)
    assert cmd[:6] == ["python3", "-m", "ray.scripts.scripts", "job", "submit", "--address"]
    assert cmd[6] == "http://head:8265" and cmd[cmd.index("--working-dir") + 1] == str(ROOT)
    sep = cmd.index("--")
    assert cmd[sep + 1:] == ["python", "-m", "lgmrec_dist.ray_train", "--data", "/shared/p", "--out", "/shared/r",
                             "--num-workers", "8", "--use-gpu"]
    local = sh("ray_train.sh", "--data", "d", env={"RAY_ADDRESS": "", "DRY_RUN": "1", "PYTHON": "python3"})
    assert shlex.split(local.stdout) == ["python3", "-m", "lgmrec_dist.ray_train", "--data", "d"]
    # the entry point's own parser accepts what the launcher passes
    from lgmrec_dist.ray_train import add_arguments
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(cmd[sep + 4:])
    assert (args.num_workers, args.use_gpu, args.out) == (8, True, "/shared/r")


def test_kuberay_rayjob_manifest():
    docs = list(yaml.safe_load_all((LAUNCH / "kuberay_rayjob.yaml").read_text()))
    job = next(d for d in docs if d and d.get("kind") == "RayJob")
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert entry.index("lgmrec prep ") < entry.index("lgmrec_dist.ray_train")  # prep, then training
    prep_parts = int(re.search(r"--partitions (\d+)", entry).group(1))
    workers = int(re.search(r"--num-workers (\d+)", entry).group(1))
    assert prep_parts == workers
    prepared = re.search(r"prep .*?--out (\S+)", entry).group(1)
    assert f"--data {prepared}" in entry
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c["name"] and c["image"] for c in head_containers)
    groups = cluster["workerGroupSpecs"]
    assert groups and sum(g["replicas"] for g in groups) >= workers
    for g in groups:
        assert g["groupName"] and "rayStartParams" in g and g["template"]["spec"]["containers"][0]["image"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        gpus = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) * g["replicas"]
                   for c in g["template"]["spec"]["containers"])
        assert gpus >= workers  # --use-gpu: one GPU per Ray Train worker
    # every pod mounts the shared volume that holds the dataset and the run directory
    for tmpl in [head["template"]] + [g["template"] for g in groups]:
        mounts = [m["mountPath"] for c in tmpl["spec"]["containers"] for m in c.get("volumeMounts", [])]
        assert "/shared" in mounts
        assert any("persistentVolumeClaim" in v for v in tmpl["spec"]["volumes"])
    assert spec["shutdownAfterJobFinishes"] is True and isinstance(spec["runtimeEnvYAML"], str)
    yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.fixture(scope="module")
def slurm_run(tiny_dataset, tmp_path_factory):
    """launch/slurm.sbatch run for real on this machine: stand-ins for srun and scontrol, one node, 2 ranks."""
    tmp = tmp_path_factory.mktemp("slurm")
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    fakes = {"srun": '#!/usr/bin/env bash\n# stand-in: one node, so one task; drop srun options\n'
                     'while [ "${1#--}" != "$1" ]; do shift; done\nexport SLURM_NODEID=0\nexec "$@"\n',
             "scontrol": '#!/usr/bin/env bash\necho 127.0.0.1\n'}
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    out = tmp / "run"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(ROOT),
           "MASTER_PORT": str(free_port()), "NPROC_PER_NODE": "2", "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("NNODES", None)
    env.pop("NODE_RANK", None)
    sets = [x for k, v in SETS.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    res = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--data", str(tiny_dataset), "--config",
                          "configs/demo.yaml", "--out", str(out), *sets],
                         cwd=tmp, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert "rendezvous 127.0.0.1" in res.stdout
    return json.loads((out / "metrics.json").read_text())


def test_ray_train_matches_torchrun(ray_cluster, slurm_run, tiny_dataset, tmp_path):
    from lgmrec_dist.config import load_config
    from lgmrec_dist.ray_train import run_ray_train

    out = tmp_path / "ray-run"
    result = run_ray_train(tiny_dataset, load_config("configs/demo.yaml", SETS), out, num_workers=2)
    ray_m = json.loads((out / "metrics.json").read_text())
    ref = slurm_run
    assert ray_m["world_size"] == ref["world_size"] == 2
    assert (ray_m["best_epoch"], ray_m["epochs_run"], ray_m["steps"]) == (ref["best_epoch"], ref["epochs_run"], ref["steps"])
    for split in ("valid", "test"):
        assert set(ray_m[split]) == set(ref[split])
        for key, value in ref[split].items():
            assert ray_m[split][key] == pytest.approx(value, abs=1e-3), (split, key)
    assert ray_m["train_loss"] == pytest.approx(ref["train_loss"], rel=1e-4)
    # Ray's view of the run: rank 0's metrics, and the best model (RUNDIR/best) as the run's checkpoint
    assert result.metrics["test/recall@20"] == ray_m["test"]["recall@20"]
    assert Path(result.checkpoint.path).resolve() == (out / "best").resolve()
    assert Path(result.path).resolve() == out.resolve()
    assert (out / "report.md").is_file() and any((out / "tb").iterdir())
    # a finished run is not overwritten by accident
    from lgmrec_dist.config import ConfigError
    with pytest.raises(ConfigError, match="already holds a finished run"):
        run_ray_train(tiny_dataset, load_config("configs/demo.yaml", SETS), out, num_workers=2)
