"""mAP, mAUC and d-prime for multi-label audio tagging (AudioSet style), as an `evaluate` metric.

This file is an `evaluate` module script, loaded by path with `cat_hf.metrics.load_metric("multilabel_tagging")`.
It depends on numpy and the standard library only (no scikit-learn or scipy at run time).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """\
Multi-label tagging scores as AST, PANNs and the CAT paper report them:

- mAP: the mean over classes of the average precision AP = sum_n (R_n - R_{n-1}) P_n over the distinct score
  thresholds (tied scores form one threshold), i.e. the non-interpolated AP of scikit-learn's
  `average_precision_score`.
- mAUC: the mean over classes of the ROC AUC (Mann-Whitney statistic, ties counted one half), i.e. scikit-learn's
  `roc_auc_score` per class.
- d-prime: sqrt(2) * Phi^-1(mAUC), Phi the standard normal CDF (AST's `d_prime`).

Classes with no positive example are excluded from mAP and mAUC (their AP is undefined) and reported by count and
index; classes whose every example is positive keep their AP (1.0) but are excluded from mAUC (no negatives).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape (n_examples, n_classes)): per-class scores (logits or
        sigmoid probabilities: AP and AUC only depend on the order within each class).
    references (`list` of `list` of `int`, shape (n_examples, n_classes)): multi-hot targets, 0 or 1.
Returns:
    mAP (`float`), mAUC (`float`), d_prime (`float`): NaN when no class could be scored; d_prime is +inf when
        mAUC is 1.
    num_examples, num_classes (`int`).
    num_classes_scored_ap (`int`): classes with at least one positive (the classes mAP averages over).
    num_classes_scored_auc (`int`): classes with at least one positive and one negative (mAUC's classes).
    num_classes_without_positives (`int`), classes_without_positives (`list` of `int`): excluded classes.
    num_classes_without_negatives (`int`), classes_without_negatives (`list` of `int`).
    per_class (`dict` of lists, one entry per class): average_precision and roc_auc (None where undefined),
        num_positives.
Examples:
    >>> from cat_hf.metrics import load_metric
    >>> metric = load_metric("multilabel_tagging")
    >>> metric.compute(predictions=[[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]], references=[[1, 0], [0, 1], [1, 0]])["mAP"]
    1.0
"""

_CITATION = """\
@inproceedings{gong21b_interspeech,
  author = {Yuan Gong and Yu-An Chung and James Glass},
  title = {{AST: Audio Spectrogram Transformer}},
  booktitle = {Proc. Interspeech 2021},
  pages = {571--575},
  year = {2021}
}
@article{kong2020panns,
  author = {Qiuqiang Kong and Yin Cao and Turab Iqbal and Yuxuan Wang and Wenwu Wang and Mark D. Plumbley},
  title = {{PANNs}: Large-Scale Pretrained Audio Neural Networks for Audio Pattern Recognition},
  journal = {IEEE/ACM Transactions on Audio, Speech, and Language Processing},
  volume = {28},
  pages = {2880--2894},
  year = {2020}
}
"""


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Non-interpolated AP of one class; tied scores are one threshold. NaN without positives."""
    num_positives = int(positives.sum())
    if num_positives == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    hits = positives[order].astype(np.float64)
    # Last index of every group of equal scores: one precision/recall point per distinct threshold.
    last_of_group = np.r_[np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), len(sorted_scores) - 1]
    true_positives = np.cumsum(hits)[last_of_group]
    retrieved = last_of_group + 1.0
    precision = true_positives / retrieved
    recall = true_positives / num_positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """ROC AUC of one class as the Mann-Whitney statistic (average ranks for ties). NaN if one side is empty."""
    num_positives = int(positives.sum())
    num_negatives = len(positives) - num_positives
    if num_positives == 0 or num_negatives == 0:
        return math.nan
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    group_starts = np.r_[0, np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]) + 1]
    group_ends = np.r_[group_starts[1:], len(sorted_scores)]
    # 1-based ranks averaged over each tie group.
    average_ranks = (group_starts + 1 + group_ends) / 2.0
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(average_ranks, group_ends - group_starts)
    positive_rank_sum = ranks[positives.astype(bool)].sum()
    return float((positive_rank_sum - num_positives * (num_positives + 1) / 2.0) / (num_positives * num_negatives))


def d_prime(auc: float) -> float:
    """sqrt(2) * Phi^-1(AUC): the AUC of two unit-variance Gaussians d' apart; +-inf at AUC 1 or 0."""
    if math.isnan(auc):
        return math.nan
    if auc >= 1.0:
        return math.inf
    if auc <= 0.0:
        return -math.inf
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def _to_list(values: np.ndarray) -> list:
    """Floats with NaN as None, so the result stays valid JSON."""
    return [None if np.isnan(v) else float(v) for v in values]


def _nan_mean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else math.nan


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MultilabelTagging(evaluate.Metric):
    """mAP / mAUC / d-prime with per-class AP and AUC for multi-label tagging."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int8")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2104.01778", "https://arxiv.org/abs/1912.10211"],
        )

    def _compute(self, predictions, references) -> dict:
        scores = np.asarray(predictions, dtype=np.float64)
        targets = np.asarray(references)
        if scores.ndim != 2 or scores.shape[0] == 0:
            raise ValueError(
                f"`predictions` must be a non-empty (n_examples, n_classes) score matrix, got shape {scores.shape}; "
                f"pass one row of per-class logits or sigmoid probabilities per example."
            )
        if targets.shape != scores.shape:
            raise ValueError(
                f"`references` must be a multi-hot matrix with the same shape as `predictions` {scores.shape}, got "
                f"{targets.shape}; encode each example's tags as a 0/1 row over the model's classes."
            )
        if not np.isin(targets, (0, 1)).all():
            raise ValueError("`references` must contain only 0 and 1 (multi-hot rows); threshold soft targets first.")
        if np.isnan(scores).any():
            raise ValueError("`predictions` contain NaN scores; check the model outputs before computing metrics.")
        positives = targets.astype(bool)
        num_examples, num_classes = scores.shape
        ap = np.array([average_precision(scores[:, c], positives[:, c]) for c in range(num_classes)])
        auc = np.array([roc_auc(scores[:, c], positives[:, c]) for c in range(num_classes)])
        num_positives = positives.sum(axis=0)
        without_positives = np.flatnonzero(num_positives == 0)
        without_negatives = np.flatnonzero(num_positives == num_examples)
        mean_auc = _nan_mean(auc)
        return {
            "mAP": _nan_mean(ap),
            "mAUC": mean_auc,
            "d_prime": d_prime(mean_auc),
            "num_examples": int(num_examples),
            "num_classes": int(num_classes),
            "num_classes_scored_ap": int(np.sum(~np.isnan(ap))),
            "num_classes_scored_auc": int(np.sum(~np.isnan(auc))),
            "num_classes_without_positives": len(without_positives),
            "classes_without_positives": without_positives.tolist(),
            "num_classes_without_negatives": len(without_negatives),
            "classes_without_negatives": without_negatives.tolist(),
            "per_class": {
                "average_precision": _to_list(ap),
                "roc_auc": _to_list(auc),
                "num_positives": num_positives.astype(int).tolist(),
            },
        }
