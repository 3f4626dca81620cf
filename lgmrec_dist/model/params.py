"""The model's hyper-parameters (docs/model.md, "Hyper-parameters"): the keys of a run's config that the
model itself reads, and nothing about how it is trained, distributed or sampled."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelParams:
    embedding_size: int = 64        # d
    n_ui_layers: int = 2            # L (CGE layers)
    n_mm_layers: int = 2            # K (MGE layers)
    n_hyper_layer: int = 1          # H (hypergraph layers)
    hyper_num: int = 4              # A (hyperedges)
    keep_rate: float = 0.5          # ρ (dropout keep rate of the dependencies)
    alpha: float = 0.3              # weight of the global embeddings in the fusion
    cl_weight: float = 1e-4         # λ_c
    reg_weight: float = 1e-6        # λ_r
    cf_model: str = "lightgcn"      # "lightgcn" | "mf"
    use_mge: bool = True
    use_ghe: bool = True
    eval_gumbel_noise: bool = False
    seed: int = 999
    feature_dtype: str = "float32"  # dtype of the precomputed feature tables
    mge_precompute: bool = True


def model_params(cfg) -> ModelParams:
    """The model's hyper-parameters of a run config (any object with those attributes)."""
    return ModelParams(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelParams)})
