"""Top-1 / top-k accuracy and per-class scores for single-label classification, as an `evaluate` metric.

This file is an `evaluate` module script: it is loaded by path (`cat_hf.metrics.load_metric("topk_accuracy")`)
because the Hub metrics (`evaluate.load("accuracy")`) cannot be fetched offline. It depends on numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Top-1 and top-k accuracy of class scores (logits or probabilities, one row per example) against integer labels,
plus per-class precision / recall / F1 / accuracy and the confusion matrix of the top-1 predictions.

Ties are broken towards the lower class index, exactly like `numpy.argmax`, so that top-1 accuracy equals the
accuracy of the argmax predictions and the top-k hit sets are nested (top-1 hit implies top-k hit). A label is a
top-k hit when fewer than k classes rank above it: classes with a higher score, and classes with an equal score
and a lower index. (scikit-learn's `top_k_accuracy_score` breaks ties the other way, towards the higher index.)
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape (n_examples, n_classes)): class scores; any monotonic
        per-row transform (logits, softmax probabilities) gives the same result.
    references (`list` of `int`, shape (n_examples,)): true class indices in [0, n_classes).
    top_k (`int` or `list` of `int`, defaults to 5): the k of the reported top-k accuracies; k >= n_classes
        gives 1.0.
Returns:
    accuracy (`float`): top-1 accuracy.
    top_{k}_accuracy (`float`): one entry per requested k.
    macro_precision, macro_recall, macro_f1 (`float`): means over the classes present in `references`.
    num_examples (`int`), num_classes (`int`).
    per_class (`dict` of lists, one entry per class): support (true examples), predicted (top-1 predictions),
        precision (0.0 when the class has examples but is never predicted; None when it is neither present
        nor predicted),
        recall (= per-class accuracy; None when the class has no example), f1 (None when recall is None),
        accuracy (same number as recall: the fraction of that class's examples classified correctly).
    confusion_matrix (`list` of `list` of `int`): rows are true classes, columns top-1 predicted classes.
Examples:
    >>> from cat_hf.metrics import load_metric
    >>> metric = load_metric("topk_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], references=[1, 2], top_k=2)["top_2_accuracy"]
    1.0
"""

_CITATION = """\
@misc{cat_hf_topk_accuracy,
  title = {Top-k accuracy (cat-hf evaluation module)},
  note = {Standard definition; tie rule documented in the module description.}
}
"""


def _ranks_with_index_tiebreak(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of each row's true label: classes strictly above it plus equal-score classes before it."""
    true_scores = scores[np.arange(len(labels)), labels][:, None]
    column = np.arange(scores.shape[1])[None, :]
    higher = scores > true_scores
    tied_before = (scores == true_scores) & (column < labels[:, None])
    return (higher | tied_before).sum(axis=1)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _to_list(values: np.ndarray) -> list:
    """Floats with NaN as None, so the result stays valid JSON."""
    return [None if np.isnan(v) else float(v) for v in values]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    """Top-1/top-k accuracy plus per-class precision/recall/F1 and the confusion matrix."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://en.wikipedia.org/wiki/Confusion_matrix"],
        )

    def _compute(self, predictions, references, top_k: int | Sequence[int] = 5) -> dict:
        scores = np.asarray(predictions, dtype=np.float64)
        labels = np.asarray(references, dtype=np.int64)
        if scores.ndim != 2 or scores.shape[0] == 0:
            raise ValueError(
                f"`predictions` must be a non-empty (n_examples, n_classes) matrix of class scores, got shape "
                f"{scores.shape}; pass one row of logits or probabilities per example."
            )
        if np.isnan(scores).any():
            raise ValueError("`predictions` contain NaN scores; check the model outputs before computing metrics.")
        num_examples, num_classes = scores.shape
        if labels.shape != (num_examples,):
            raise ValueError(
                f"`references` must hold one integer label per prediction row ({num_examples}), got shape {labels.shape}."
            )
        if labels.min() < 0 or labels.max() >= num_classes:
            bad = sorted(set(labels[(labels < 0) | (labels >= num_classes)].tolist()))
            raise ValueError(
                f"`references` contain labels {bad} outside [0, {num_classes}); map the dataset labels onto the "
                f"model's label ids first."
            )
        ks = [top_k] if isinstance(top_k, (int, np.integer)) else list(top_k)
        if any(int(k) < 1 for k in ks):
            raise ValueError(f"`top_k` values must be >= 1, got {ks}.")

        ranks = _ranks_with_index_tiebreak(scores, labels)
        result: dict = {"accuracy": float(np.mean(ranks == 0))}
        for k in ks:
            result[f"top_{int(k)}_accuracy"] = float(np.mean(ranks < int(k)))

        predicted = scores.argmax(axis=1)
        confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        true_positives = np.diag(confusion).astype(np.float64)
        support = confusion.sum(axis=1)
        predicted_count = confusion.sum(axis=0)
        recall = _safe_divide(true_positives, support.astype(np.float64))
        precision = _safe_divide(true_positives, predicted_count.astype(np.float64))
        # A class present in the references but never predicted has precision 0 (scikit-learn's zero_division=0).
        precision[(predicted_count == 0) & (support > 0)] = 0.0
        precision_or_zero = np.nan_to_num(precision, nan=0.0)
        f1 = _safe_divide(2 * precision_or_zero * recall, precision_or_zero + recall)
        f1[(support > 0) & np.isnan(f1)] = 0.0
        present = support > 0
        result.update(
            {
                "macro_precision": float(np.mean(precision_or_zero[present])),
                "macro_recall": float(np.mean(recall[present])),
                "macro_f1": float(np.mean(f1[present])),
                "num_examples": int(num_examples),
                "num_classes": int(num_classes),
                "per_class": {
                    "support": support.tolist(),
                    "predicted": predicted_count.tolist(),
                    "precision": _to_list(precision),
                    "recall": _to_list(recall),
                    "f1": _to_list(f1),
                    "accuracy": _to_list(recall),
                },
                "confusion_matrix": confusion.tolist(),
            }
        )
        return result
