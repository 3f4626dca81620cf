"""Training configuration: YAML files in configs/ plus ``--set key=value`` overrides.

Keys keep the official LGMRec/MMRec names where one exists (docs/model.md §1.10). An unknown key or a
value of the wrong type is an error that names the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lgmrec_dist.errors import UserError


class ConfigError(UserError, ValueError):
    pass


@dataclass
class Config:
    # optimisation (docs/model.md §1.10, configs/overall.yaml of the official code)
    epochs: int = 1000
    train_batch_size: int = 2048
    learning_rate: float = 1e-3
    stopping_step: int = 20
    seed: int = 999
    max_steps: int = 0                      # stop after this many optimizer steps (0 = no limit)
    # model (§1.1, §1.10)
    embedding_size: int = 64
    cf_model: str = "lightgcn"              # "lightgcn" | "mf" (ablation: no CGE propagation)
    n_ui_layers: int = 2                    # L
    n_mm_layers: int = 2                    # K
    n_hyper_layer: int = 1                  # H
    hyper_num: int = 4                      # A
    keep_rate: float = 0.5                  # rho
    alpha: float = 0.3
    cl_weight: float = 1e-4                 # lambda_c
    reg_weight: float = 1e-6                # lambda_r
    use_mge: bool = True                    # ablation switch: modality graph embeddings
    use_ghe: bool = True                    # ablation switch: global hypergraph embeddings (and HCL)
    eval_gumbel_noise: bool = False         # True = official stochastic inference (§6.2.1)
    mge_precompute: bool = True             # speed rewrite: precompute G^K [P X ; X] once (docs/model.md)
    feature_dtype: str = "float32"          # dtype of the precomputed feature tables (Y_m, R·X_m): "float32" |
                                            # "bfloat16" | "float16"; rows become float32 when read (docs/sampled.md)
    # large-catalogue mode (docs/sampled.md); exact is the default and the reference
    mode: str = "exact"                     # "exact" | "sampled"
    fanouts: list = field(default_factory=lambda: [-1])  # per CGE layer (-1 = all neighbours); one value = every layer
    hyper_refresh_steps: int = 0            # sampled: r >= 1 = hyperedge messages from a full pass (no gradient)
                                            # every r steps, held constant in between; 0 = exact (every step, with gradient)
    hyper_refreshes_per_epoch: int = 0      # sampled, r >= 1: at most this many full refreshes per epoch (the interval
                                            # becomes max(r, ceil(steps per epoch / this)); amortised cost flat in |U|+|I|);
                                            # 0 = a refresh every r steps whatever the catalogue (docs/sampled.md)
    hyper_message_grad: bool = True         # sampled, r >= 1: gradient of the held messages estimated from the batch's
                                            # negative items (straight-through; the value stays the refreshed one)
    hyper_message_update: bool = False      # sampled, r >= 1: each step replaces its own items' contributions to the
                                            # held messages by the ones it computed (O(batch); docs/sampled.md)
    hcl_negatives: str = "all"              # sampled: "all" (exact) | "in_batch" | "uniform" contrastive denominators
    hcl_num_negatives: int = 1024           # sampled, uniform: negative users and negative items drawn per step
    sparse_embeddings: bool = False         # sampled: sparse row gradients + SparseAdam (only touched rows move)
    user_feature_table: bool = True         # sampled: hold R·X_m (|U| × d_m) for the user hyperedge logits; false =
                                            # sum each step's users' item rows X_m[i]·V_m instead (no table, more reads)
    shard_tables: bool = False              # sampled, P ranks: row-shard E_U, E_I (with RowAdam's moments) and X_m,
                                            # Y_m, R·X_m over the ranks (1/P each; owners serve rows and products)
    sampler_workers: int = 0                # sampled: DataLoader worker processes that prefetch the sampled blocks
                                            # (0 = sample in the training process, synchronously)
    # evaluation (§2)
    eval_batch_size: int = 4096
    eval_item_tile: int = 8192
    topk: list = field(default_factory=lambda: [5, 10, 20, 50])
    valid_metric: str = "recall@20"
    valid_users: int = 0                    # > 0: validate (early stopping, best epoch) on a fixed random sample of
                                            # this many users (all items ranked); test metrics use every user
    # checkpoints (docs/checkpoints.md)
    checkpoint_every_steps: int = 0         # also checkpoint every N optimizer steps (0 = epoch ends only)
    checkpoint_every_epoch: bool = True     # checkpoint after each epoch's evaluation
    keep_checkpoints: int = 2               # keep the last K checkpoints
    # runtime
    device: str = "auto"                    # "auto" | "cpu" | "cuda"
    num_threads: int = 0                    # torch intra-op threads (0 = torch default)
    deterministic: bool = True              # same seed, same metrics run to run (docs/model.md "Reproducibility");
                                            # false lets torch pick nondeterministic kernels
    partitioning: str = "auto"              # distributed: "auto" (prep's partitions if made for this
                                            # many ranks, else contiguous), "dataset", "contiguous"

    def validate(self) -> "Config":
        for key, hint in _HINTS.items():  # nan and inf pass every comparison below; refuse them first
            if hint is float and not math.isfinite(getattr(self, key)):
                raise ConfigError(f"{key}: must be a finite number, got {getattr(self, key)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate: must be > 0, got {self.learning_rate}")
        for key in ("alpha", "cl_weight", "reg_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            raise ConfigError(f"seed: must be in [0, 2**32), got {self.seed}")
        if self.mode not in ("exact", "sampled"):
            raise ConfigError(f"mode: expected 'exact' or 'sampled', got {self.mode!r}")
        if self.hcl_negatives not in ("all", "in_batch", "uniform"):
            raise ConfigError(f"hcl_negatives: expected 'all', 'in_batch' or 'uniform', got {self.hcl_negatives!r}")
        if not self.fanouts or any((not isinstance(f, int)) or f == 0 or f < -1 for f in self.fanouts):
            raise ConfigError(f"fanouts: expected a list of positive integers or -1, got {self.fanouts!r}")
        if len(self.fanouts) not in (1, self.n_ui_layers) and self.n_ui_layers > 0:
            raise ConfigError(f"fanouts: give one value or one per CGE layer ({self.n_ui_layers}), got {self.fanouts!r}")
        if self.mode == "sampled" and self.sparse_embeddings and self.use_ghe and self.hyper_refresh_steps == 0:
            raise ConfigError("sparse_embeddings: needs hyper_refresh_steps >= 1 when use_ghe is true (with 0 the "
                              "hyperedge messages are recomputed with gradient from every item at every step, "
                              "which touches every embedding row; docs/sampled.md)")
        if self.mode == "sampled" and self.shard_tables and not self.sparse_embeddings:
            raise ConfigError("shard_tables: needs sparse_embeddings true (each rank applies RowAdam to the "
                              "embedding rows it owns; docs/sampled.md)")
        if self.mode == "sampled" and self.shard_tables and self.use_ghe and (
                self.hyper_refresh_steps == 0 or self.hcl_negatives == "all"):
            raise ConfigError("shard_tables: needs hyper_refresh_steps >= 1 and hcl_negatives 'in_batch' or "
                              "'uniform' when use_ghe is true (the exact messages and denominators read every "
                              "item's features at every step; docs/sampled.md)")
        if self.feature_dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"feature_dtype: expected 'float32', 'bfloat16' or 'float16', got {self.feature_dtype!r}")
        if self.cf_model not in ("lightgcn", "mf"):
            raise ConfigError(f"cf_model: expected 'lightgcn' or 'mf', got {self.cf_model!r}")
        if self.partitioning not in ("auto", "dataset", "contiguous"):
            raise ConfigError(f"partitioning: expected 'auto', 'dataset' or 'contiguous', got {self.partitioning!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device: expected 'auto', 'cpu' or 'cuda', got {self.device!r}")
        for key in ("epochs", "train_batch_size", "embedding_size", "hyper_num", "eval_batch_size",
                    "eval_item_tile", "hcl_num_negatives", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("n_ui_layers", "n_mm_layers", "max_steps", "stopping_step", "num_threads", "valid_users",
                    "checkpoint_every_steps", "hyper_refresh_steps", "hyper_refreshes_per_epoch", "sampler_workers",
                    "n_hyper_layer"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.use_ghe and self.n_hyper_layer < 1:
            raise ConfigError("n_hyper_layer: must be >= 1 when use_ghe is true (docs/model.md §1.6)")
        if not 0.0 < self.keep_rate <= 1.0:
            raise ConfigError(f"keep_rate: must be in (0, 1], got {self.keep_rate}")
        if not self.topk or any((not isinstance(k, int)) or k < 1 for k in self.topk):
            raise ConfigError(f"topk: expected a list of positive integers, got {self.topk!r}")
        metric, _, k = self.valid_metric.partition("@")
        if metric not in ("recall", "ndcg", "precision", "map") or not k.isdigit() or int(k) not in self.topk:
            raise ConfigError(f"valid_metric: expected e.g. 'recall@20' with K in topk, got {self.valid_metric!r}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


_HINTS = typing.get_type_hints(Config)

# ``mode: sampled`` without these keys gets the measured large-catalogue settings (docs/sampled.md,
# "Defaults"); a key given in the file or by ``--set`` wins. The exact mode never reads them.
SAMPLED_DEFAULTS = {"fanouts": [5, 5], "hyper_refresh_steps": 20, "hyper_refreshes_per_epoch": 2,
                    "hyper_message_update": True, "hcl_negatives": "uniform", "sparse_embeddings": True}
# The sampled mode computing exactly what the exact mode computes (docs/sampled.md, "Defaults").
# hyper_refreshes_per_epoch=0 and hyper_message_update=false keep a given r >= 1 meaning "a full pass every r
# steps, held unchanged in between" (the other switches' old values).
SAMPLED_EXACT = ["mode=sampled", "fanouts=[-1]", "hyper_refresh_steps=0", "hyper_refreshes_per_epoch=0",
                 "hyper_message_update=false", "hcl_negatives=all", "sparse_embeddings=false"]


def _coerce(key: str, value):
    """Check ``value`` against the declared type of ``key``; ints are accepted for floats."""
    expected = _HINTS[key]
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif expected is str:
        ok = isinstance(value, str)
    else:  # list
        ok = isinstance(value, list)
    if not ok:
        name = getattr(expected, "__name__", str(expected))
        raise ConfigError(f"config key {key!r}: expected {name}, got {value!r} ({type(value).__name__})")
    return value


def apply(cfg: Config, values: dict, source: str) -> Config:
    for key, value in values.items():
        if key not in _HINTS:
            raise ConfigError(f"unknown config key {key!r} (from {source})")
        setattr(cfg, key, _coerce(key, value))
    return cfg


def parse_overrides(items: list[str] | None) -> dict:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}``; values are parsed as YAML scalars."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = _yaml_load(raw, f"--set {item}") if raw.strip() else ""
    return out


def _yaml_load(text, source: str):
    """``yaml.safe_load`` with its errors (syntax, tags such as ``!!python/object``) as a ConfigError."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not a plain YAML value ({' '.join(str(exc).split())})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text ({exc})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    cfg, given = Config(), set()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}" + (" (a directory)" if path.is_dir() else ""))
        with open(path, encoding="utf-8") as fh:
            values = _yaml_load(fh, str(path)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys")
        apply(cfg, values, str(path))
        given |= set(values)
    if overrides:
        values = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        apply(cfg, values, "--set")
        given |= set(values)
    if cfg.mode == "sampled":
        apply(cfg, {k: v for k, v in SAMPLED_DEFAULTS.items() if k not in given}, "sampled-mode defaults")
    return cfg.validate()
