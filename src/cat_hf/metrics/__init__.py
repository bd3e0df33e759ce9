"""Evaluation metrics shipped inside cat-hf as `evaluate` module scripts.

`evaluate.load("accuracy")` needs the Hugging Face Hub, which is unreachable offline, so cat-hf ships its own
metric scripts next to this file and loads them by path. For a local script `evaluate.load` never touches the
network: it copies the script into its modules cache (`HF_MODULES_CACHE`, by default
`~/.cache/huggingface/modules/evaluate_modules/metrics/<name>/<hash of the code>/`) to import it, and creates the
(empty) metric data folder under `cache_dir` (default `HF_METRICS_CACHE`). Predictions stay in memory
(`keep_in_memory=True`), so nothing else is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

METRICS_DIR = Path(__file__).resolve().parent

# name -> what it computes
AVAILABLE_METRICS: dict[str, str] = {
    "topk_accuracy": "single-label: top-1/top-k accuracy, per-class precision/recall/F1, confusion matrix",
    "multilabel_tagging": "multi-label: mAP, mAUC, d-prime, per-class AP and ROC AUC",
}


def metric_path(name: str) -> Path:
    """Path of the script of a shipped metric (`name` without `.py`)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(
            f"Unknown cat-hf metric {name!r}; choose one of {sorted(AVAILABLE_METRICS)} or pass the path of an "
            f"`evaluate` metric script (a file ending in .py)."
        )
    return METRICS_DIR / f"{name}.py"


def load_metric(
    name: str, *, cache_dir: str | Path | None = None, keep_in_memory: bool = True, **kwargs: Any
) -> evaluate.EvaluationModule:
    """Load a shipped metric (or any local `evaluate` script path) with `evaluate.load`, offline.

    Args:
        name: a key of `AVAILABLE_METRICS` (e.g. "topk_accuracy") or a path to a metric script ending in ".py".
        cache_dir: where `evaluate` creates the metric's data folder (default: its `HF_METRICS_CACHE`).
        keep_in_memory: keep predictions in memory instead of arrow files in `cache_dir` (one process only).
        kwargs: passed to `evaluate.load` (e.g. `experiment_id`).
    """
    import evaluate  # imported here: it pulls in `datasets`, too slow for `import cat_hf.metrics` alone

    path = Path(name) if str(name).endswith(".py") else metric_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"No metric script at {path}; pass an existing `evaluate` metric .py file.")
    return evaluate.load(
        str(path),
        cache_dir=None if cache_dir is None else str(cache_dir),
        keep_in_memory=keep_in_memory,
        **kwargs,
    )


__all__ = ["AVAILABLE_METRICS", "METRICS_DIR", "load_metric", "metric_path"]
