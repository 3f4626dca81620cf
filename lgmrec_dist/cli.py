"""``lgmrec`` command line (also ``python -m lgmrec_dist``).

Every subcommand runs through ``entry.guarded``, the one error path of the command line
(docs/failures.md): an expected failure prints one ``error: ...`` line and exits 2; anything else
keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from lgmrec_dist.entry import guarded


def cmd_train(args) -> int:
    if args.nproc < 0:
        from lgmrec_dist.config import ConfigError
        raise ConfigError(f"--nproc: must be >= 0 (0 = this process), got {args.nproc}")
    if args.nproc:  # convenience: one node, P processes, via torchrun
        import subprocess

        from lgmrec_dist.config import load_config
        load_config(args.config, args.set)  # a bad value: one error line here, not one per rank from torchrun
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "lgmrec_dist.train", "--data", args.data, "--out", args.out]
        cmd += ["--config", args.config] if args.config else []
        cmd += [x for kv in args.set for x in ("--set", kv)] + (["--overwrite"] if args.overwrite else [])
        cmd += ["--init-from", args.init_from] if args.init_from else []
        return subprocess.call(cmd)
    from lgmrec_dist import train
    return train.run(args)


def cmd_import_mmrec(args) -> int:
    from data_prep.mmrec import import_mmrec
    from lgmrec_dist.dataset import parse_named_paths
    manifest = import_mmrec(args.inter, parse_named_paths(args.feature, "--feature"), args.out,
                            overwrite=args.overwrite)
    keys = ("num_users", "num_items", "num_interactions", "num_train", "num_valid", "num_test", "modalities")
    for key in keys:
        print(f"{key:<17} {manifest[key]}")
    print(f"wrote {args.out}")
    return 0


def cmd_export_mmrec(args) -> int:
    from data_prep.mmrec import export_mmrec
    export_mmrec(args.data, args.out, name=args.name, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def cmd_synth_mmrec(args) -> int:
    from data_prep.mmrec import check_modality_name
    from data_prep.synthetic import make_mmrec_synthetic
    from lgmrec_dist.dataset import DatasetError
    mods = {}
    for part in args.modalities.split(","):
        name, _, dim = part.partition(":")
        check_modality_name(name, "--modalities")
        if not dim.isdigit() or int(dim) < 1 or name in mods:
            raise DatasetError(f"--modalities: expected distinct NAME:DIM with DIM a positive integer, got {part!r}")
        mods[name] = int(dim)
    for flag, low in (("users", 1), ("items", 1), ("interactions", 1), ("seed", 0)):
        if getattr(args, flag) < low:
            raise DatasetError(f"--{flag}: must be >= {low}, got {getattr(args, flag)}")
    path = make_mmrec_synthetic(args.out, num_users=args.users, num_items=args.items,
                                num_interactions=args.interactions, modalities=mods, seed=args.seed,
                                name=args.name)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lgmrec", description="Distributed LGMRec: prepare, train, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)

    from lgmrec_dist.train import add_arguments
    t = sub.add_parser("train", help="train and evaluate LGMRec on a prepared dataset")
    add_arguments(t)
    t.add_argument("--nproc", type=int, default=0, metavar="P",
                   help="launch P processes on this node with torchrun (exact distributed training)")
    t.set_defaults(func=cmd_train)

    i = sub.add_parser("import-mmrec", help="MMRec .inter + .npy features -> prepared dataset directory")
    i.add_argument("--inter", required=True, help="MMRec <name>.inter file (tab-separated, with x_label)")
    i.add_argument("--feature", action="append", required=True, metavar="NAME=FILE.npy",
                   help="modality features, row i = item i; repeat per modality (first = HCL anchor)")
    i.add_argument("--out", required=True)
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(func=cmd_import_mmrec)

    e = sub.add_parser("export-mmrec", help="prepared dataset directory -> MMRec .inter + <modality>_feat.npy")
    e.add_argument("--data", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--name", help="dataset name for <name>.inter (default: the directory name)")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export_mmrec)

    s = sub.add_parser("synth-mmrec", help="synthetic dataset with planted structure, in MMRec form")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=2000)
    s.add_argument("--items", type=int, default=1000)
    s.add_argument("--interactions", type=int, default=40000)
    s.add_argument("--modalities", default="image:128,text:64", help="NAME:DIM,... (default image:128,text:64)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default="synthetic")
    s.set_defaults(func=cmd_synth_mmrec)
    from data_prep import extract, prep, synth_parquet
    from lgmrec_dist import export, ray_train, report, serve, sweep
    synth_parquet.register_cli(sub)
    prep.register_cli(sub)
    extract.register_cli(sub)
    export.register_cli(sub)
    report.register_cli(sub)
    sweep.register_cli(sub)
    serve.register_cli(sub)
    ray_train.register_cli(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
