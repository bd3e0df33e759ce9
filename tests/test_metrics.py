"""The shipped `evaluate` metric modules, loaded by path, against scikit-learn on the same predictions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from statistics import NormalDist

import evaluate
import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from cat_hf.metrics import AVAILABLE_METRICS, load_metric, metric_path

SEEDS = [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def topk(tmp_path_factory):
    return load_metric("topk_accuracy", cache_dir=tmp_path_factory.mktemp("metric_cache"))


@pytest.fixture(scope="module")
def tagging(tmp_path_factory):
    return load_metric("multilabel_tagging", cache_dir=tmp_path_factory.mktemp("metric_cache"))


def _scores(rng: np.random.Generator, shape: tuple[int, int], ties: bool) -> np.ndarray:
    scores = rng.standard_normal(shape)
    # One decimal on a few distinct values: many exact ties within rows and within columns.
    return np.round(scores, 1) if ties else scores


def _none_to_nan(values: list) -> np.ndarray:
    return np.array(values, dtype=float)


def test_metrics_are_evaluate_metrics_with_info(topk, tagging):
    for metric in (topk, tagging):
        assert isinstance(metric, evaluate.Metric)
        assert metric.info.citation.strip() and metric.info.description.strip()
        assert set(metric.info.features) == {"predictions", "references"}
    assert metric_path("topk_accuracy").is_file() and set(AVAILABLE_METRICS) == {"topk_accuracy", "multilabel_tagging"}
    with pytest.raises(ValueError, match="Unknown cat-hf metric"):
        load_metric("accuracy")


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_topk_accuracy_matches_sklearn(topk, seed, ties):
    rng = np.random.default_rng(seed)
    num_examples, num_classes = 300, 7
    scores = _scores(rng, (num_examples, num_classes), ties)
    labels = rng.integers(0, num_classes - 1, size=num_examples)  # the last class never occurs: support 0
    result = topk.compute(predictions=scores, references=labels, top_k=[1, 2, 3, 5])

    predicted = scores.argmax(axis=1)
    assert result["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=1e-12)
    assert result["top_1_accuracy"] == result["accuracy"]
    # Our ties go to the lower class index (like argmax); scikit-learn's top_k_accuracy_score sends them to the higher
    # one. Reversing the class order turns one rule into the other, so the comparison is exact, ties included.
    reversed_scores, reversed_labels = scores[:, ::-1], num_classes - 1 - labels
    for k in (1, 2, 3, 5):
        expected = top_k_accuracy_score(reversed_labels, reversed_scores, k=k, labels=np.arange(num_classes))
        assert result[f"top_{k}_accuracy"] == pytest.approx(expected, abs=1e-12), k
        if not ties:
            assert result[f"top_{k}_accuracy"] == pytest.approx(
                top_k_accuracy_score(labels, scores, k=k, labels=np.arange(num_classes)), abs=1e-12
            )

    np.testing.assert_array_equal(
        result["confusion_matrix"], confusion_matrix(labels, predicted, labels=range(num_classes))
    )
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=range(num_classes), zero_division=0
    )
    per_class = result["per_class"]
    np.testing.assert_array_equal(per_class["support"], support)
    present = support > 0
    np.testing.assert_allclose(_none_to_nan(per_class["recall"])[present], recall[present], atol=1e-12)
    np.testing.assert_allclose(_none_to_nan(per_class["f1"])[present], f1[present], atol=1e-12)
    assert per_class["accuracy"] == per_class["recall"]
    defined_precision = np.array([p is not None for p in per_class["precision"]])
    np.testing.assert_allclose(_none_to_nan(per_class["precision"])[defined_precision], precision[defined_precision])
    # The absent last class: no recall / F1 (None), excluded from the macro means.
    assert per_class["recall"][-1] is None and per_class["f1"][-1] is None
    macro = precision_recall_fscore_support(
        labels, predicted, labels=np.flatnonzero(present), average="macro", zero_division=0
    )
    assert result["macro_precision"] == pytest.approx(macro[0], abs=1e-12)
    assert result["macro_recall"] == pytest.approx(macro[1], abs=1e-12)
    assert result["macro_f1"] == pytest.approx(macro[2], abs=1e-12)


def test_topk_ties_rule_and_edge_cases(topk):
    # All scores tied: the lowest class index wins top-1, so only label 0 is a top-1 hit and labels < k are top-k hits.
    scores = np.zeros((4, 4))
    result = topk.compute(predictions=scores, references=[0, 1, 2, 3], top_k=[2, 4, 9])
    assert result["accuracy"] == 0.25 and result["top_2_accuracy"] == 0.5
    assert result["top_4_accuracy"] == 1.0 and result["top_9_accuracy"] == 1.0  # k >= classes: always a hit
    # A single class: every prediction is right.
    single = topk.compute(predictions=[[0.3], [-2.0]], references=[0, 0], top_k=1)
    assert single["accuracy"] == 1.0 and single["confusion_matrix"] == [[2]]
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        topk.compute(predictions=np.zeros((2, 3)), references=[0, 3])
    with pytest.raises(ValueError, match="NaN"):
        topk.compute(predictions=[[0.1, math.nan]], references=[0])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_multilabel_tagging_matches_sklearn(tagging, seed, ties):
    rng = np.random.default_rng(seed)
    num_examples, num_classes = 250, 9
    prevalence = rng.uniform(0.03, 0.5, size=num_classes)
    targets = (rng.random((num_examples, num_classes)) < prevalence).astype(np.int64)
    targets[:, 0] = 0  # no positives: excluded from mAP and mAUC
    targets[:, 1] = 1  # no negatives: AP is 1, excluded from mAUC
    # Scores correlated with the targets so the numbers are far from chance, with noise (and ties when rounded).
    scores = _scores(rng, (num_examples, num_classes), ties) + 0.8 * targets
    scores = np.round(scores, 1) if ties else scores
    result = tagging.compute(predictions=scores, references=targets)

    ap = _none_to_nan(result["per_class"]["average_precision"])
    auc = _none_to_nan(result["per_class"]["roc_auc"])
    assert math.isnan(ap[0]) and math.isnan(auc[0]) and math.isnan(auc[1]) and ap[1] == pytest.approx(1.0)
    for c in range(1, num_classes):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12), c
    for c in range(2, num_classes):
        assert auc[c] == pytest.approx(roc_auc_score(targets[:, c], scores[:, c]), abs=1e-12), c

    with_positives = targets.sum(axis=0) > 0
    expected_map = average_precision_score(targets[:, with_positives], scores[:, with_positives], average="macro")
    expected_mauc = roc_auc_score(targets[:, 2:], scores[:, 2:], average="macro")
    assert result["mAP"] == pytest.approx(expected_map, abs=1e-12)
    assert result["mAUC"] == pytest.approx(expected_mauc, abs=1e-12)
    assert result["d_prime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(expected_mauc), abs=1e-12)
    assert result["num_classes_without_positives"] == 1 and result["classes_without_positives"] == [0]
    assert result["classes_without_negatives"] == [1]
    assert result["num_classes_scored_ap"] == num_classes - 1 and result["num_classes_scored_auc"] == num_classes - 2
    assert result["per_class"]["num_positives"] == targets.sum(axis=0).tolist()
    json.dumps(result, allow_nan=False)  # JSON-safe apart from d_prime at AUC 1 (not the case here)


def test_d_prime_formula_and_scipy(tagging):
    from scipy.stats import norm

    module = _load_module_by_path("multilabel_tagging")
    for auc in (0.5, 0.6, 0.76, 0.9, 0.99, 0.3):
        assert module.d_prime(auc) == pytest.approx(math.sqrt(2.0) * norm.ppf(auc), rel=1e-9, abs=1e-12)
    # d' is the separation of two unit Gaussians whose AUC is Phi(d' / sqrt 2).
    for separation in (0.25, 1.0, 2.5):
        assert module.d_prime(NormalDist().cdf(separation / math.sqrt(2))) == pytest.approx(separation, rel=1e-9)
    assert module.d_prime(1.0) == math.inf and module.d_prime(0.5) == 0.0
    perfect = tagging.compute(predictions=[[0.9], [0.1], [0.8]], references=[[1], [0], [1]])  # one class only
    assert perfect["mAP"] == 1.0 and perfect["mAUC"] == 1.0 and perfect["d_prime"] == math.inf


def test_multilabel_edge_cases(tagging):
    none_positive = tagging.compute(predictions=[[0.2, 0.1], [0.4, 0.3]], references=[[0, 0], [0, 0]])
    assert math.isnan(none_positive["mAP"]) and math.isnan(none_positive["mAUC"])
    assert none_positive["num_classes_without_positives"] == 2
    # Every example tied at one score: AP = prevalence, AUC = 0.5 (both as scikit-learn).
    tied = tagging.compute(predictions=[[0.5]] * 4, references=[[1], [0], [0], [1]])
    assert tied["mAP"] == pytest.approx(0.5) and tied["mAUC"] == pytest.approx(0.5) and tied["d_prime"] == 0.0
    with pytest.raises(ValueError, match="only 0 and 1"):
        tagging.compute(predictions=[[0.5, 0.5]], references=[[2, 0]])
    with pytest.raises(ValueError, match="same shape"):
        tagging.compute(predictions=[[0.5, 0.5]], references=[[1]])


def _load_module_by_path(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_cat_hf_metric_{name}", metric_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_metric_offline_writes_only_under_its_caches(tmp_path):
    """In a fresh process with the Hub switched off, loading by path works and writes only to the given caches."""
    home, work = tmp_path / "hf_home", tmp_path / "work"
    work.mkdir()
    script = textwrap.dedent(
        f"""
        import json
        from cat_hf.metrics import load_metric
        metric = load_metric("multilabel_tagging", cache_dir={str(tmp_path / "metric_data")!r})
        print(json.dumps(metric.compute(predictions=[[0.9, 0.2], [0.1, 0.7]], references=[[1, 0], [0, 1]])["mAP"]))
        """
    )
    env = {
        **os.environ,
        "HF_HOME": str(home),
        "HF_EVALUATE_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("HF_MODULES_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=work, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == 1.0
    assert list(work.iterdir()) == []  # nothing in the working directory
    copied = list(
        (home / "modules" / "evaluate_modules" / "metrics" / "multilabel_tagging").rglob("multilabel_tagging.py")
    )
    assert len(copied) == 1 and copied[0].read_text() == metric_path("multilabel_tagging").read_text()
    assert not (home / "metrics").exists()  # the metric data folder went to cache_dir instead
    assert (tmp_path / "metric_data" / "multilabel_tagging").is_dir()
    assert not any(p.suffix == ".arrow" for p in Path(tmp_path).rglob("*"))  # predictions stayed in memory
